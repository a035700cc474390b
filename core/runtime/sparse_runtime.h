// SpeContext sparse mode for programs built on Runtime (CLI, services, benchmarks): loads the retrieval
// head and builds the SparseDecoder that EngineOptions::sparse takes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/sparse_decoder.h"
#include "core/runtime/runtime.h"
#include "core/sparse/retrieval_head.h"

namespace specontext {

struct SparseRuntimeOptions {
  std::string retrieval_head;     // head directory (specontext prune); required by the head source only
  int64_t budget = 2048;          // --budget: past tokens per KV head
  int64_t sink = 1;               // --sink: first tokens always attended
  std::string selection = "head"; // "head" (one set per KV head) or "batch" (one set per sequence)
  int64_t gpu_memory_limit = 0;   // --gpu-memory-limit for the planner (0: the backend's limit, else off)
  double synthetic_overlap = 0;   // benchmarks only: SparseOptions::synthetic_overlap (0 = off)
  int64_t max_context = 0;        // --max-context: SparseOptions::max_context (0 = the model's context)
  SparseStepShape step;           // --max-tokens-per-step, --max-batch: SparseOptions::step (the engine's step)
  // --selection-source: head, window, oracle or quest (SparseOptions::source); the last three load no head
  // (a --retrieval-head given with them is ignored, with a warning).
  std::string selection_source = "head";
  double fallback_mass = 0;       // --fallback-mass: SparseOptions::fallback_mass (0 = off; head source only)
  AttentionRecallObserver recall_observer;  // SparseOptions::recall_observer (null = no probe)
};

struct SparseRuntime {
  std::unique_ptr<RetrievalHead> head;      // must outlive the decoder (declared first, destroyed last); null
                                            // for the sources that need none
  std::shared_ptr<SparseDecoder> decoder;   // put into EngineOptions::sparse
  // With tensor parallelism: the decoders of ranks 1.. over Runtime::tp_models (index = rank - 1), each with
  // its own copy of the head on its rank's backend, its own KV tiers and planner; `decoder` is rank 0's.
  std::vector<std::shared_ptr<SparseDecoder>> tp_decoders;
};

/// Validates the options against the loaded model and builds the sparse decoder (one per tensor-parallel rank).
/// Errors name the flag.
absl::StatusOr<SparseRuntime> MakeSparseRuntime(const Runtime& runtime, const SparseRuntimeOptions& options);

}  // namespace specontext
