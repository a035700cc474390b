// SpeContext counters of the generator (Engine::sparse_stats(), split-mode retrieval) as Prometheus
// families, and their copy into a response's SparsityStats.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/metrics/metrics.h"
#include "core/model/sparse_hooks.h"
#include "proto/specontext.pb.h"

namespace specontext::generator {

/// Retrieval-path counters that SparseEngineStats does not carry (split mode: remote retriever).
struct RetrievalPathStats {
  int64_t remote_steps = 0;    // decode steps whose index sets came from the retriever service
  int64_t fallback_steps = 0;  // decode steps that fell back (retriever down, late or in error)
  int64_t reconnects = 0;      // sessions re-opened after a failure
  bool connected = false;
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

  /// Brings the families up to `s` (cumulative counters advance by the difference). Engine thread.
  void Update(const SparseEngineStats& s, const RetrievalPathStats& r);
};

absl::StatusOr<SparseMetrics> RegisterSparseMetrics(metrics::Registry* registry);

/// Engine-wide counters into a final response's statistics (per-request fields are set by the caller).
void FillSparsityStats(const SparseEngineStats& s, const RetrievalPathStats& r, v1::SparsityStats* out);

}  // namespace specontext::generator
