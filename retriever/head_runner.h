// The retrieval head on one Backend shared by all of a retriever's sessions (`--backend cuda|auto`): the
// same DeviceRetrievalHead forward and Backend::SelectIndexSets selection the in-process sparse decoder
// runs (core/model/sparse_decoder.h), behind one mutex.
//
// Threading: gRPC runs sessions on several threads, and a Backend is used by one thread at a time. Every
// method takes the runner's mutex for the backend work it does and nothing else (validation, accounting
// and the sessions' maps stay outside), so sessions never hold it across each other's calls. Tensors the
// runner hands out (caches, queries) belong to its backend: they are dropped through Release, under the
// mutex, never by a session's destructor directly.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/backend.h"
#include "core/sparse/retrieval_head_device.h"
#include "core/sparse/selection.h"

namespace specontext::retriever {

class HeadRunner {
 public:
  /// Uploads `head` to `backend` (which the runner then owns). `head` must outlive the runner.
  static absl::StatusOr<std::unique_ptr<HeadRunner>> Create(const RetrievalHead& head,
                                                            std::unique_ptr<Backend> backend);
  ~HeadRunner();
  HeadRunner(const HeadRunner&) = delete;
  HeadRunner& operator=(const HeadRunner&) = delete;

  /// The backend's name ("cpu", "cuda") and its compute dtype (that of the caches and queries).
  std::string backend_name() const { return backend_name_; }
  DType compute_dtype() const { return compute_dtype_; }
  /// Bytes of one element of a cache or query (f32 on the CPU backend, bf16 on CUDA).
  int64_t element_bytes() const;

  /// Grows (or first allocates, when empty) a sequence's K cache to [n_kv_heads, rows, head_dim] keeping
  /// its rows; no-op when it already has `rows`. ResourceExhausted past the backend's memory.
  absl::Status Grow(Tensor* cache, int64_t rows);

  /// One sequence's part of an Observe batch: its new tokens `ids` at positions [pos, pos + n); their K goes
  /// to rows [pos, pos + n) of `*cache`; `*last_q` ([n_heads, head_dim], allocated on first use) receives
  /// the last token's query. `fused`: [n, fused_width] f32 host rows (eagle3), empty otherwise.
  struct ObserveSeq {
    std::span<const int32_t> ids;
    std::span<const float> fused;
    Tensor* cache = nullptr;
    int32_t pos = 0;
    Tensor* last_q = nullptr;
  };
  /// Observes a ragged batch in one DeviceRetrievalHead::Observe (one upload of the ids and features,
  /// converted to the compute dtype, one forward, one scatter); each sequence's rows are those a single
  /// Observe of it would write. The caller has grown every cache to hold its new rows.
  absl::Status Observe(std::span<const ObserveSeq> batch);

  /// Backend::SelectIndexSets of `batch` (q and k_cache from Observe and Grow); the result is host memory.
  absl::StatusOr<SelectionResult> Select(std::span<const SelectionQuery> batch, const SelectionOptions& options);

  /// Drops backend tensors (a closed or destroyed sequence's cache and query) under the mutex.
  void Release(std::vector<Tensor> tensors);

 private:
  HeadRunner() = default;

  absl::Mutex mu_;
  std::unique_ptr<Backend> backend_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<DeviceRetrievalHead> head_ ABSL_GUARDED_BY(mu_);
  std::string backend_name_;
  DType compute_dtype_ = DType::kF32;
};

}  // namespace specontext::retriever
