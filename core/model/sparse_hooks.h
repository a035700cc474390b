// The engine's view of SpeContext sparse decoding (DESIGN.md §4): an interface the Engine calls for KV
// allocation and for each step's forward, so that the engine (spc_model) does not depend on the retrieval
// head library. The implementation is SparseDecoder (core/model/sparse_decoder.h, spc_sparse_engine).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/transformer.h"
#include "core/sparse/elastic.h"

namespace specontext {

/// Counters and planner state for the services' metrics (cumulative unless noted).
struct SparseEngineStats {
  ElasticCounters elastic;        // overlap ratio, rows/bytes loaded, bytes a full reload would move
  int64_t sparse_steps = 0;       // decode forwards that used SparseAttention
  int64_t dense_steps = 0;        // decode forwards on the exact dense path (every past <= budget)
  int64_t layer_moves = 0;        // layers moved to host (all sequences at once count one)
  int32_t gpu_layers = 0;         // now: layers whose full KV is on the device
  int32_t offloaded_layers = 0;   // now: layers in host memory behind slot buffers
  int64_t host_kv_bytes = 0;      // now: pinned host bytes (Backend::host_memory_report total)
  int64_t device_bytes = 0;       // now: device bytes (Backend::memory_report total)
  double last_captured_mass = 1;  // last step: mean attention mass the selection kept (retrieval head)
};

/// One sequence of a step as the engine hands it over.
struct SparseStepSeq {
  uint64_t id = 0;
  int32_t budget = 0;  // resolved per-request budget (>= 1)
};

class SparseDecodeHooks {
 public:
  virtual ~SparseDecodeHooks() = default;
  /// KV for a newly admitted sequence, in the current tiers, with its per-sequence state.
  virtual absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(uint64_t id, int32_t capacity,
                                                                 int32_t budget) = 0;
  /// Forgets a finished sequence's state (its SequenceKv is freed by the engine).
  virtual void Release(uint64_t id) = 0;
  /// Runs one step: `fwd` as for Transformer::Forward (last-token logits [fwd.size(), vocab] into
  /// `logits`), seqs[i] describes fwd[i].
  virtual absl::Status Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                               Tensor* logits) = 0;
  /// The budget a request gets when it names none.
  virtual int32_t default_budget() const = 0;
  virtual SparseEngineStats stats() const = 0;
};

}  // namespace specontext
