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

/// Cumulative host wall seconds of SparseDecoder's decode steps by phase (steady_clock around each phase;
/// no device synchronisation is added, so a phase that waits for the device includes that wait: `select`
/// the index-set download, `forward` the logits download). Benchmarks print them per step.
struct SparseStepSeconds {
  int64_t steps = 0;      // decode calls timed (sparse and dense)
  double observe = 0;     // retrieval head: ids upload, forward and K-cache append (queued on the backend)
  double select = 0;      // Backend::SelectIndexSets incl. the index-set download, captured mass
  double synthetic = 0;   // SyntheticOverlap::Apply (benchmarks only)
  double plan = 0;        // PlanElasticLoads, FullReloadCopies, per-layer copy lists
  double forward = 0;     // hidden capture setup and Transformer::Forward incl. its logits download
  double apply = 0;       // ApplyElasticPlan, keeping the sets, eagle3 hidden rows
  double total = 0;       // whole decode calls (the phases plus glue)
};

/// Counters and planner state for the services' metrics (cumulative unless noted).
struct SparseEngineStats {
  ElasticCounters elastic;        // overlap ratio, rows/bytes loaded, bytes a full reload would move
  int64_t sparse_steps = 0;       // decode forwards that used SparseAttention
  int64_t dense_steps = 0;        // decode forwards on the exact dense path (every past <= budget)
  int64_t layer_moves = 0;        // layers moved to host (all sequences at once count one)
  int64_t layer_returns = 0;      // layers moved back to the device (sequences finished)
  int64_t kv_grows = 0;           // sequences whose device KV grew by a chunk (SparseOptions::kv_grow_rows)
  double kv_grow_seconds = 0;     // host wall time of those growths (copies and frees wait for the device)
  double layer_move_seconds = 0;  // host wall time of the layer moves and returns (allocation, copy, free)
  int32_t gpu_layers = 0;         // now: layers whose full KV is on the device
  int32_t offloaded_layers = 0;   // now: layers in host memory behind slot buffers
  int64_t host_kv_bytes = 0;      // now: pinned host bytes (Backend::host_memory_report total)
  int64_t device_bytes = 0;       // now: device bytes (Backend::memory_report total)
  double last_captured_mass = 1;  // last step: mean attention mass the selection kept (retrieval head)
  // Weak-retrieval fallback (SparseOptions::fallback_mass): decode steps with at least one weak sequence, and
  // the sequence-steps that fell back (each weak sequence of a step counts one; its resident layers attended
  // densely, the other sequences' did not).
  int64_t weak_retrieval_fallback_steps = 0;
  int64_t weak_retrieval_fallback_sequences = 0;
  SparseStepSeconds decode_seconds;  // host time of decode steps by phase (SparseDecoder only)
};

/// One sequence of a step as the engine hands it over.
struct SparseStepSeq {
  uint64_t id = 0;
  int32_t budget = 0;  // resolved per-request budget (>= 1)
};

// The largest step the engine runs over a sparse decoder (EngineOptions of the same names; the generator
// passes its --max-tokens-per-step and --max-batch to both): what the planner's step bound is sized for.
struct SparseStepShape {
  int32_t max_tokens_per_step = 512;
  int32_t max_batch = 32;
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
  /// The same with the logits left on the backend: f32 [fwd.size(), vocab], valid until the next call (the
  /// engine samples on the device and downloads only token ids). Unimplemented (before doing anything) by
  /// hooks that do not support it: the engine then calls Forward.
  virtual absl::StatusOr<Tensor> ForwardDevice(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs) {
    return absl::UnimplementedError("this sparse decoder returns host logits only");
  }
  /// The budget a request gets when it names none.
  virtual int32_t default_budget() const = 0;
  virtual SparseEngineStats stats() const = 0;
  /// The largest step its memory plan covers: tokens of one step, sequences of one step (0: no bound). The
  /// engine keeps its steps within them (EngineOptions::max_tokens_per_step, max_batch).
  virtual int32_t max_step_tokens() const { return 0; }
  virtual int32_t max_step_seqs() const { return 0; }
};

}  // namespace specontext
