#include "generator/generator_metrics.h"

#include <unistd.h>

#include <cstdio>

#include "core/status_macros.h"

namespace specontext::generator {

std::string StatusCodeName(int code) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",      "UNIMPLEMENTED",     "INTERNAL",         "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return kNames[code];
}

void GeneratorMetrics::CountRequest(const std::string& code) {
  auto child = requests->WithLabels({code});
  if (child.ok()) (*child)->Increment();
}

void GeneratorMetrics::UpdateMemory(const MemoryReport& report) {
  for (size_t k = 0; k < report.bytes.size(); ++k) {
    auto g = device_memory->WithLabels({std::string(MemoryKindName(static_cast<MemoryKind>(k)))});
    if (g.ok()) (*g)->Set(static_cast<double>(report.bytes[k]));
  }
  device_memory_peak->Set(static_cast<double>(report.peak));
  // Resident set size: the second field of /proc/self/statm, in pages.
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    long size = 0, resident = 0;
    if (std::fscanf(f, "%ld %ld", &size, &resident) == 2) {
      host_rss->Set(static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)));
    }
    std::fclose(f);
  }
}

absl::StatusOr<GeneratorMetrics> RegisterGeneratorMetrics(metrics::Registry* r) {
  GeneratorMetrics m;
  const std::vector<double> latency = metrics::LatencyBucketsSeconds();
  ASSIGN_OR_RETURN(m.requests, r->AddCounter("spc_generator_requests_total",
                                             "Generate calls finished (gRPC and HTTP), by status code name.", {"code"}));
  // Pre-create the common codes so dashboards see zeros rather than absent series.
  for (const char* code : {"OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                           "UNAVAILABLE", "INTERNAL"}) {
    RETURN_IF_ERROR(m.requests->WithLabels({code}).status());
  }
  auto counter = [r](const char* name, const char* help) { return r->AddUnlabeledCounter(name, help); };
  auto gauge = [r](const char* name, const char* help) { return r->AddUnlabeledGauge(name, help); };
  auto histogram = [&](const char* name, const char* help) -> absl::StatusOr<metrics::Histogram*> {
    ASSIGN_OR_RETURN(metrics::HistogramFamily * f, r->AddHistogram(name, help, {}, latency));
    return f->WithLabels({});
  };
  ASSIGN_OR_RETURN(m.tokens_generated, counter("spc_generator_generated_tokens_total", "Tokens generated."));
  ASSIGN_OR_RETURN(m.prompt_tokens, counter("spc_generator_prompt_tokens_total", "Prompt tokens processed."));
  ASSIGN_OR_RETURN(m.cancelled, counter("spc_generator_cancelled_total",
                                        "Requests cancelled by the client or their deadline."));
  ASSIGN_OR_RETURN(m.merged_events, counter("spc_generator_merged_events_total",
                                            "Stream events merged because a client read slower than generation."));
  ASSIGN_OR_RETURN(m.engine_step_errors, counter("spc_generator_engine_step_errors_total",
                                                 "Engine steps whose forward pass failed."));
  ASSIGN_OR_RETURN(m.retriever_fallback_steps,
                   counter("spc_retrieval_fallback_steps_total",
                           "Decode steps that fell back to dense attention because the retriever was down or late."));
  ASSIGN_OR_RETURN(m.retriever_reconnects,
                   counter("spc_retriever_reconnects_total", "Reconnections to a remote retriever."));
  ASSIGN_OR_RETURN(m.ttft, histogram("spc_time_to_first_token_seconds",
                                     "Time from arrival to the first generated token."));
  ASSIGN_OR_RETURN(m.tpot, histogram("spc_time_per_output_token_seconds",
                                     "Mean time per generated token after the first, per request."));
  ASSIGN_OR_RETURN(m.request_latency, histogram("spc_request_duration_seconds",
                                                "Time from arrival to the final message of a Generate call."));
  ASSIGN_OR_RETURN(m.retrieval_latency, histogram("spc_retrieval_latency_seconds",
                                                  "Time from a retriever Select to its index sets."));
  ASSIGN_OR_RETURN(m.queue_depth, gauge("spc_generator_queue_depth", "Requests waiting for admission."));
  ASSIGN_OR_RETURN(m.running, gauge("spc_generator_running_sequences", "Sequences in the running batch."));
  ASSIGN_OR_RETURN(m.active_calls, gauge("spc_generator_active_calls", "Generate calls being served."));
  ASSIGN_OR_RETURN(m.draining, gauge("spc_generator_draining", "1 while draining after SIGTERM."));
  ASSIGN_OR_RETURN(m.tensor_parallel_ranks,
                   gauge("spc_tensor_parallel_ranks", "Ranks of tensor parallelism (--tensor-parallel); 1 = none."));
  ASSIGN_OR_RETURN(m.device_memory, r->AddGauge("spc_device_memory_bytes",
                                                "Live backend memory by kind.", {"kind"}));
  ASSIGN_OR_RETURN(m.device_memory_peak, gauge("spc_device_memory_peak_bytes", "Peak live backend memory."));
  ASSIGN_OR_RETURN(m.host_rss, gauge("spc_host_resident_memory_bytes", "Resident host memory of the process."));
  ASSIGN_OR_RETURN(m.sparse, RegisterSparseMetrics(r));
  return m;
}

}  // namespace specontext::generator
