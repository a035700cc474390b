// Runs a list of generation requests through one Engine with continuous batching (a request that finishes
// makes room for the next), the path that serves requests, so accuracy and speed come from the same code.
// In sparse mode it also records the step-to-step overlap of the index sets (OverlapRecorder).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/eval/overlap_recorder.h"
#include "core/model/engine.h"
#include "core/model/sparse_decoder.h"

namespace specontext {

struct BatchOutcome {
  std::vector<int32_t> tokens;  // generated (or forced) tokens, a final stop token included
  std::string text;             // their text (stop strings cut, special tokens skipped)
  FinishReason reason = FinishReason::kNone;
  GenerationStats stats;
};

struct BatchRunStats {
  double wall_seconds = 0;        // first submission to last completion
  int64_t generated_tokens = 0;
  int64_t sparse_steps = 0;       // decode steps on the sparse path (SparseEngineStats), during this run
  int64_t dense_steps = 0;
  // Weak-retrieval fallback: sparse steps with at least one weak sequence, and the sequence-steps that fell
  // back (only the weak sequence attends densely in the resident layers; the others keep their sets).
  int64_t weak_retrieval_fallback_steps = 0;
  int64_t weak_retrieval_fallback_sequences = 0;
  std::vector<double> overlap;    // OverlapRecorder samples of this run (sparse mode)
};

class BatchRunner {
 public:
  /// `engine` runs the requests; `decoder` is the engine's SparseDecoder in sparse mode (the overlap is read
  /// from it), null in dense mode. Both must outlive the runner.
  BatchRunner(Engine* engine, const SparseDecoder* decoder) : engine_(engine), decoder_(decoder) {}

  /// Runs every request to completion, keeping at most `max_in_flight` submitted (running or queued) at a
  /// time; `on_done(i, outcome)` runs on this thread as request i completes. The first error (a request
  /// refused by Engine::Submit, or a failed step) ends the run and is returned, prefixed by `name(i)` of the
  /// request it concerns where there is one.
  absl::StatusOr<BatchRunStats> Run(std::vector<GenerationRequest> requests, int32_t max_in_flight,
                                    const std::function<std::string(size_t)>& name,
                                    const std::function<void(size_t, BatchOutcome)>& on_done);

 private:
  Engine* engine_;
  const SparseDecoder* decoder_;
  OverlapRecorder overlap_;
};

}  // namespace specontext
