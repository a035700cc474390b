#include "core/eval/batch_runner.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/sparse/selection_source.h"

namespace specontext {

absl::StatusOr<BatchRunStats> BatchRunner::Run(std::vector<GenerationRequest> requests, int32_t max_in_flight,
                                               const std::function<std::string(size_t)>& name,
                                               const std::function<void(size_t, BatchOutcome)>& on_done) {
  BatchRunStats run;
  overlap_.ClearSamples();
  const SparseEngineStats start_stats = engine_->sparse_stats();
  int64_t seen_sparse_steps = start_stats.sparse_steps;
  const absl::Time start = absl::Now();
  // Outcomes being filled by the engine's callbacks; handed to on_done (and freed) when a request finishes.
  struct Pending {
    size_t index;
    uint64_t engine_id = 0;
    BatchOutcome outcome;
    absl::Status status;
    bool done = false;
  };
  std::vector<std::unique_ptr<Pending>> in_flight;
  // On an error, the requests still in the engine are cancelled; one step finishes them all (cancellations
  // are applied before anything runs), so no callback outlives `in_flight`.
  auto fail = [&](absl::Status st) {
    for (const auto& p : in_flight) {
      if (!p->done) engine_->Cancel(p->engine_id);
    }
    if (engine_->HasWork()) engine_->Step().IgnoreError();
    return st;
  };
  size_t next = 0;
  max_in_flight = std::max(1, max_in_flight);
  while (next < requests.size() || !in_flight.empty()) {
    while (next < requests.size() && static_cast<int32_t>(in_flight.size()) < max_in_flight) {
      auto p = std::make_unique<Pending>();
      p->index = next;
      Pending* raw = p.get();
      absl::StatusOr<uint64_t> id = engine_->Submit(std::move(requests[next]), [raw](const StreamEvent& ev) {
        if (ev.token >= 0) raw->outcome.tokens.push_back(ev.token);
        raw->outcome.text += ev.text;
        if (ev.done) {
          raw->done = true;
          raw->outcome.reason = ev.reason;
          raw->outcome.stats = ev.stats;
          raw->status = ev.status;
        }
      });
      if (!id.ok()) return fail(absl::Status(id.status().code(), absl::StrCat(name(next), ": ", id.status().message())));
      p->engine_id = *id;
      in_flight.push_back(std::move(p));
      ++next;
    }
    const absl::Status st = engine_->Step();
    // The engine finished every request of a failed step with the error; report the first one's name.
    for (const auto& p : in_flight) {
      if (p->done && !p->status.ok()) {
        return fail(absl::Status(p->status.code(), absl::StrCat(name(p->index), ": ", p->status.message())));
      }
    }
    if (!st.ok()) return fail(st);
    // Per-layer sources (oracle, quest) choose each layer's positions inside the forward: last_sets() holds
    // only placeholders of the right sizes, so they have no step-to-step overlap to record.
    if (decoder_ != nullptr && !IsPerLayerSource(decoder_->source()) &&
        decoder_->stats().sparse_steps != seen_sparse_steps) {
      seen_sparse_steps = decoder_->stats().sparse_steps;
      overlap_.Observe(decoder_->last_sets(), decoder_->last_set_ids());
    }
    for (auto& p : in_flight) {
      if (!p->done) continue;
      overlap_.Forget(p->engine_id);
      run.generated_tokens += p->outcome.stats.generated_tokens;
      on_done(p->index, std::move(p->outcome));
    }
    std::erase_if(in_flight, [](const auto& p) { return p->done; });
  }
  run.wall_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const SparseEngineStats end_stats = engine_->sparse_stats();
  run.sparse_steps = end_stats.sparse_steps - start_stats.sparse_steps;
  run.dense_steps = end_stats.dense_steps - start_stats.dense_steps;
  run.weak_retrieval_fallback_steps =
      end_stats.weak_retrieval_fallback_steps - start_stats.weak_retrieval_fallback_steps;
  run.weak_retrieval_fallback_sequences =
      end_stats.weak_retrieval_fallback_sequences - start_stats.weak_retrieval_fallback_sequences;
  run.overlap = overlap_.samples();
  return run;
}

}  // namespace specontext
