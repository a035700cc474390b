// SpeContext counters of the generator (Engine::sparse_stats(), split-mode retrieval) as Prometheus
// families, and their copy into a response's SparsityStats.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/metrics/metrics.h"
#include "core/model/sparse_hooks.h"
#include "proto/specontext.pb.h"

namespace specontext::generator {

/// Cumulative host wall seconds of split mode's engine steps (RemoteSparseDecoder's Forward or ForwardDevice
/// calls, both passes) by phase: absl::Now() at each phase boundary, no device synchronisation added, so a
/// phase that waits for the device includes that wait. Exported as spc_split_step_seconds_total{phase} (with
/// `other`, the rest of the calls, so that the phases add up to their wall time) and spc_split_steps_total.
struct SplitStepSeconds {
  int64_t steps = 0;          // calls timed
  double plan_layers = 0;     // PlanLayers: the tier planner, layer moves, device KV growth
  double observe = 0;         // the Observes: token ids and features into ObserveBatch messages, their sends
                              // (and a new session's re-opens and replays)
  double select_wait = 0;     // each Select sent until its Selection is taken from the inbox: the retriever's
                              // head forward and selection, the transfer, the reader thread's parse
  double selection = 0;       // the Selection into the step's IndexSets: copy, ValidateSelection, the merge of
                              // budget groups; window sets (short pasts, fallback with offloaded layers)
  double elastic_plan = 0;    // PlanElasticLoads and FullReloadCopies (offloaded layers)
  double forward = 0;         // the Transformer forwards of both passes: with host logits incl. their
                              // download; with device logits the enqueue (the engine's sampling waits)
  double features = 0;        // EAGLE-3 heads: the captured hidden states downloaded and converted to f32
                              // (waits for the forward on the device)
  double logits = 0;          // both passes' logits rows into the step's order (steps with both passes)
  double apply = 0;           // ApplyElasticPlan (the slot maps)
  double total = 0;           // whole calls

  /// The phases as (label, seconds), `other` last (total minus the named phases, at least 0).
  std::vector<std::pair<const char*, double>> Phases() const;
};

/// Retrieval-path counters that SparseEngineStats does not carry (split mode: remote retriever).
struct RetrievalPathStats {
  int64_t remote_steps = 0;    // decode steps whose index sets came from the retriever service
  int64_t fallback_steps = 0;  // decode steps that fell back (retriever down, late or in error)
  int64_t reconnects = 0;      // sessions re-opened after a failure
  bool connected = false;
  SplitStepSeconds step_seconds;  // where split mode's steps spend their host time
};

struct SparseMetrics {
  metrics::Gauge* overlap_ratio = nullptr;       // spc_elastic_overlap_ratio
  metrics::Counter* rows_loaded = nullptr;       // spc_kv_rows_loaded_total
  metrics::Counter* bytes_loaded = nullptr;      // spc_kv_bytes_loaded_total
  metrics::Counter* bytes_full_reload = nullptr; // spc_kv_bytes_full_reload_total
  metrics::Counter* bytes_avoided = nullptr;     // spc_kv_bytes_avoided_total
  metrics::Counter* sparse_steps = nullptr;      // spc_sparse_decode_steps_total
  metrics::Counter* dense_steps = nullptr;       // spc_dense_decode_steps_total
  metrics::Counter* layer_moves = nullptr;       // spc_kv_layer_moves_total
  metrics::Counter* layer_returns = nullptr;     // spc_kv_layer_returns_total
  metrics::Counter* kv_grows = nullptr;          // spc_kv_grows_total
  metrics::Counter* remote_steps = nullptr;      // spc_retrieval_remote_steps_total
  metrics::Counter* weak_fallback_steps = nullptr;  // spc_weak_retrieval_fallback_steps_total
  metrics::Counter* weak_fallback_sequences = nullptr;  // spc_weak_retrieval_fallback_sequences_total
  metrics::Counter* prefetch_hidden = nullptr;   // spc_prefetch_hidden_seconds_total
  metrics::Counter* prefetch_exposed = nullptr;  // spc_prefetch_exposed_seconds_total
  metrics::Gauge* offloaded_layers = nullptr;    // spc_offloaded_layers
  metrics::Gauge* gpu_layers = nullptr;          // spc_resident_layers
  metrics::Gauge* host_kv_bytes = nullptr;       // spc_host_kv_bytes
  metrics::Gauge* captured_mass = nullptr;       // spc_captured_attention_mass
  metrics::Gauge* retriever_connected = nullptr; // spc_retriever_connected
  metrics::Counter* split_steps = nullptr;       // spc_split_steps_total
  // spc_split_step_seconds_total{phase}, one child per SplitStepSeconds::Phases() label, in that order.
  std::vector<metrics::Counter*> split_step_seconds;

  /// Brings the families up to `s` (cumulative counters advance by the difference). Engine thread.
  void Update(const SparseEngineStats& s, const RetrievalPathStats& r);
};

absl::StatusOr<SparseMetrics> RegisterSparseMetrics(metrics::Registry* registry);

/// One line of split mode's step phases, milliseconds per step: "steps=N select_wait=9.1 forward=3.2 ..."
/// (every phase, in Phases() order); "steps=0" before the first step.
std::string SplitStepSummary(const SplitStepSeconds& s);

/// Engine-wide counters into a final response's statistics (per-request fields are set by the caller).
void FillSparsityStats(const SparseEngineStats& s, const RetrievalPathStats& r, v1::SparsityStats* out);

}  // namespace specontext::generator
