#include "generator/sparse_metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

#include "core/status_macros.h"

namespace specontext::generator {
namespace {

// Counters only move forward: advance a counter to the engine's cumulative value.
void AdvanceTo(metrics::Counter* c, double value) {
  const double delta = value - c->Value();
  if (delta > 0) c->Increment(delta);
}

}  // namespace

std::vector<std::pair<const char*, double>> SplitStepSeconds::Phases() const {
  std::vector<std::pair<const char*, double>> p = {
      {"plan_layers", plan_layers}, {"observe", observe}, {"select_wait", select_wait},
      {"selection", selection},     {"elastic_plan", elastic_plan}, {"forward", forward},
      {"features", features},       {"logits", logits},   {"apply", apply}};
  double named = 0;
  for (const auto& [name, s] : p) named += s;
  p.push_back({"other", std::max(0.0, total - named)});
  return p;
}

std::string SplitStepSummary(const SplitStepSeconds& s) {
  std::string out = absl::StrCat("steps=", s.steps);
  if (s.steps == 0) return out;
  const double per_step_ms = 1e3 / static_cast<double>(s.steps);
  absl::StrAppend(&out, " total_ms=", absl::SixDigits(s.total * per_step_ms));
  for (const auto& [name, secs] : s.Phases()) absl::StrAppend(&out, " ", name, "_ms=", absl::SixDigits(secs * per_step_ms));
  return out;
}

void SparseMetrics::Update(const SparseEngineStats& s, const RetrievalPathStats& r) {
  overlap_ratio->Set(s.elastic.overlap_ratio());
  AdvanceTo(rows_loaded, static_cast<double>(s.elastic.rows_loaded));
  AdvanceTo(bytes_loaded, static_cast<double>(s.elastic.bytes_loaded));
  AdvanceTo(bytes_full_reload, static_cast<double>(s.elastic.bytes_full_reload));
  AdvanceTo(bytes_avoided, static_cast<double>(std::max<int64_t>(0, s.elastic.bytes_full_reload -
                                                                        s.elastic.bytes_loaded)));
  AdvanceTo(sparse_steps, static_cast<double>(s.sparse_steps));
  AdvanceTo(dense_steps, static_cast<double>(s.dense_steps));
  AdvanceTo(layer_moves, static_cast<double>(s.layer_moves));
  AdvanceTo(layer_returns, static_cast<double>(s.layer_returns));
  AdvanceTo(kv_grows, static_cast<double>(s.kv_grows));
  AdvanceTo(remote_steps, static_cast<double>(r.remote_steps));
  AdvanceTo(weak_fallback_steps, static_cast<double>(s.weak_retrieval_fallback_steps));
  AdvanceTo(weak_fallback_sequences, static_cast<double>(s.weak_retrieval_fallback_sequences));
  AdvanceTo(prefetch_hidden, s.elastic.copy_hidden_seconds());
  AdvanceTo(prefetch_exposed, s.elastic.copy_exposed_seconds);
  offloaded_layers->Set(s.offloaded_layers);
  gpu_layers->Set(s.gpu_layers);
  host_kv_bytes->Set(static_cast<double>(s.host_kv_bytes));
  captured_mass->Set(s.last_captured_mass);
  retriever_connected->Set(r.connected ? 1 : 0);
  AdvanceTo(split_steps, static_cast<double>(r.step_seconds.steps));
  const auto phases = r.step_seconds.Phases();
  for (size_t i = 0; i < phases.size() && i < split_step_seconds.size(); ++i) {
    AdvanceTo(split_step_seconds[i], phases[i].second);
  }
}

absl::StatusOr<SparseMetrics> RegisterSparseMetrics(metrics::Registry* r) {
  SparseMetrics m;
  auto counter = [r](const char* name, const char* help) { return r->AddUnlabeledCounter(name, help); };
  auto gauge = [r](const char* name, const char* help) { return r->AddUnlabeledGauge(name, help); };
  ASSIGN_OR_RETURN(m.overlap_ratio, gauge("spc_elastic_overlap_ratio",
                                          "Elastic loading: selected rows already in the slot buffers / rows selected."));
  ASSIGN_OR_RETURN(m.rows_loaded, counter("spc_kv_rows_loaded_total", "KV rows copied into slot buffers."));
  ASSIGN_OR_RETURN(m.bytes_loaded, counter("spc_kv_bytes_loaded_total", "KV bytes copied into slot buffers."));
  ASSIGN_OR_RETURN(m.bytes_full_reload, counter("spc_kv_bytes_full_reload_total",
                                                "KV bytes a full reload of every selected row would have moved."));
  ASSIGN_OR_RETURN(m.bytes_avoided, counter("spc_kv_bytes_avoided_total",
                                            "KV bytes elastic loading did not move (full reload minus loaded)."));
  ASSIGN_OR_RETURN(m.sparse_steps, counter("spc_sparse_decode_steps_total", "Decode forwards with sparse attention."));
  ASSIGN_OR_RETURN(m.dense_steps, counter("spc_dense_decode_steps_total",
                                          "Decode forwards on the exact dense path (every past within its budget)."));
  ASSIGN_OR_RETURN(m.layer_moves, counter("spc_kv_layer_moves_total", "Layers whose KV moved to host memory."));
  ASSIGN_OR_RETURN(m.layer_returns, counter("spc_kv_layer_returns_total",
                                            "Layers whose KV moved back to the device (sequences finished)."));
  ASSIGN_OR_RETURN(m.kv_grows, counter("spc_kv_grows_total",
                                       "Sequences whose device KV grew by a chunk (resident layers re-homed)."));
  ASSIGN_OR_RETURN(m.remote_steps, counter("spc_retrieval_remote_steps_total",
                                           "Decode steps whose index sets came from the retriever service."));
  ASSIGN_OR_RETURN(m.weak_fallback_steps,
                   counter("spc_weak_retrieval_fallback_steps_total",
                           "Decode steps with at least one sequence whose retrieval head kept less than "
                           "--fallback-mass of its attention mass."));
  ASSIGN_OR_RETURN(m.weak_fallback_sequences,
                   counter("spc_weak_retrieval_fallback_sequences_total",
                           "Sequence-steps that fell back: a sequence whose retrieval head kept less than "
                           "--fallback-mass of its attention mass attended densely in the resident layers."));
  ASSIGN_OR_RETURN(m.prefetch_hidden, counter("spc_prefetch_hidden_seconds_total",
                                              "Elastic prefetch time hidden behind compute (copy time the compute "
                                              "stream did not wait for; GPU only)."));
  ASSIGN_OR_RETURN(m.prefetch_exposed, counter("spc_prefetch_exposed_seconds_total",
                                               "Elastic prefetch time the compute stream stood waiting for (GPU only)."));
  ASSIGN_OR_RETURN(m.offloaded_layers, gauge("spc_offloaded_layers", "Layers whose KV lives in host memory."));
  ASSIGN_OR_RETURN(m.gpu_layers, gauge("spc_resident_layers", "Layers whose full KV is on the device."));
  ASSIGN_OR_RETURN(m.host_kv_bytes, gauge("spc_host_kv_bytes", "Pinned host bytes holding offloaded KV."));
  ASSIGN_OR_RETURN(m.captured_mass, gauge("spc_captured_attention_mass",
                                          "Last step: mean retrieval-head attention mass the selection kept."));
  ASSIGN_OR_RETURN(m.retriever_connected, gauge("spc_retriever_connected",
                                                "1 while the session with a remote retriever is up."));
  ASSIGN_OR_RETURN(m.split_steps, counter("spc_split_steps_total",
                                          "Split mode: engine steps run by the remote-retriever sparse decoder."));
  ASSIGN_OR_RETURN(metrics::CounterFamily * phases,
                   r->AddCounter("spc_split_step_seconds_total",
                                 "Split mode: host wall seconds of the engine steps by phase (docs/services.md); "
                                 "the phases add up to the steps' wall time.",
                                 {"phase"}));
  for (const auto& [name, secs] : SplitStepSeconds{}.Phases()) {
    ASSIGN_OR_RETURN(metrics::Counter * c, phases->WithLabels({name}));
    m.split_step_seconds.push_back(c);
  }
  return m;
}

void FillSparsityStats(const SparseEngineStats& s, const RetrievalPathStats& r, v1::SparsityStats* out) {
  out->set_kv_bytes_loaded(s.elastic.bytes_loaded);
  out->set_kv_bytes_avoided(std::max<int64_t>(0, s.elastic.bytes_full_reload - s.elastic.bytes_loaded));
  out->set_elastic_overlap_ratio(s.elastic.overlap_ratio());
  out->set_kv_rows_loaded(s.elastic.rows_loaded);
  out->set_full_reload_bytes(s.elastic.bytes_full_reload);
  out->set_offloaded_layers(s.offloaded_layers);
  out->set_engine_sparse_steps(s.sparse_steps);
  out->set_engine_dense_steps(s.dense_steps);
  out->set_captured_attention_mass(s.last_captured_mass);
  out->set_layer_moves(s.layer_moves);
  out->set_reconnects(r.reconnects);
}

}  // namespace specontext::generator
