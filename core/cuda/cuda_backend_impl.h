// The CudaBackend class (internal to core/cuda; users include cuda_backend.h).
#pragma once

#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_memory.h"
#include "core/cuda/kernels/attention.h"

namespace specontext::cuda {

// Pinned host staging for metadata uploads; `ready` is recorded after each copy out of it so the
// next write waits only for that copy.
struct PinnedStaging {
  void* host = nullptr;
  size_t bytes = 0;
  cudaEvent_t ready = nullptr;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options);
  ~CudaBackend() override;
  // Creates the stream, cuBLAS handle and fixed buffers; called once by MakeCudaBackend.
  absl::Status Init();

  DeviceKind device() const override { return DeviceKind::kCuda; }
  std::string name() const override { return name_; }
  DType compute_dtype() const override { return DType::kBF16; }

  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) override;
  absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) override;
  absl::Status CopyToDevice(const Tensor& host, Tensor* device) override;
  absl::Status ToHost(const Tensor& device, Tensor* host) override;
  absl::Status CopyDevice(const Tensor& src, Tensor* dst) override;
  absl::Status Zero(Tensor* t) override;
  absl::Status CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) override;
  absl::Status Synchronize() override;
  MemoryReport memory_report() const override { return memory_->Report(); }
  int64_t available_bytes() const override { return memory_->Available(); }

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) override;
  absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                          Tensor* out) override;
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) override;
  absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) override;
  absl::Status PrepareBatch(const BatchDesc& batch) override;
  absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) override;

  // ---- KV tiers and sparse decode (cuda_sparse.cc) ----
  absl::StatusOr<Tensor> AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) override;
  MemoryReport host_memory_report() const override;
  absl::Status CopyToPinnedHost(const Tensor& device, Tensor* host) override;
  absl::Status KvAppendHost(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status PrepareSparseDecode(const SparseDecodeDesc& desc) override;
  absl::Status ElasticLoad(int layer, const CopyList& copies, ElasticCounters* counters) override;
  absl::Status SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur, float scale,
                               Tensor* out) override;
  // Waits for the copy stream (elastic loads). SparseAttention(layer) orders itself after its layer's
  // load; code that reads slot buffers otherwise (tests, benchmarks) calls this first.
  absl::Status SyncCopyStream();
  struct SparseState;  // internal (cuda_sparse_state.h)

  cudaStream_t stream() const { return stream_; }
  int sm_count() const { return sm_count_; }

 private:
  // Waits for the stream and turns a device-side error flag (bad token id) into a status.
  absl::Status SyncAndCheck();
  // Copies `bytes` of `src` through `staging` into device memory `dst` on the stream.
  absl::Status Upload(PinnedStaging& staging, const void* src, size_t bytes, void* dst);
  // Grows a device byte buffer (kWorkspace) to at least `bytes`.
  absl::Status EnsureBuffer(Tensor* buf, size_t bytes);
  // Builds and uploads the attention work lists of the current batch for `n_heads` query heads.
  absl::Status PlanAttention(int n_heads);

  const CudaBackendOptions options_;
  std::string name_;
  std::shared_ptr<CudaMemory> memory_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  Tensor cublas_workspace_;
  int sm_count_ = 1;
  int* error_flag_host_ = nullptr;  // mapped pinned memory
  int* error_flag_dev_ = nullptr;

  // ---- current batch (PrepareBatch) ----
  BatchDesc batch_;
  bool batch_valid_ = false;
  int n_layers_ = 0;
  int n_kv_ = 0;
  int head_dim_ = 0;
  Tensor meta_;  // [AttnSeq x S][row_seq i32 x T][k ptrs L x S][v ptrs L x S]
  size_t off_row_seq_ = 0, off_k_ptrs_ = 0, off_v_ptrs_ = 0;
  PinnedStaging batch_staging_;

  // ---- attention plan, built on the first Attention call after PrepareBatch ----
  int planned_heads_ = 0;  // 0 = no plan
  Tensor plan_;            // [prefill items][decode items][combine items]
  int n_prefill_items_ = 0, n_decode_items_ = 0, n_combine_ = 0;
  size_t off_decode_ = 0, off_combine_ = 0;
  Tensor partials_;  // split-K partial O and LSE
  size_t off_lse_ = 0;
  PinnedStaging plan_staging_;

  // ---- KV tiers and sparse decode (cuda_sparse.cc): copy stream, per-layer events, index-set buffers.
  // Created on first use; shared_ptr because the type is complete only in cuda_sparse_state.h.
  absl::StatusOr<SparseState*> Sparse();
  absl::Status EnsureTierTables(int layer);
  std::shared_ptr<SparseState> sparse_;
};

}  // namespace specontext::cuda
