// Metric families of the generator service, registered in one Registry that the service passes in.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/metrics/metrics.h"
#include "generator/sparse_metrics.h"

namespace specontext::generator {

struct GeneratorMetrics {
  metrics::CounterFamily* requests = nullptr;  // spc_generator_requests_total{code}
  metrics::Counter* tokens_generated = nullptr;
  metrics::Counter* prompt_tokens = nullptr;
  metrics::Counter* cancelled = nullptr;
  metrics::Counter* merged_events = nullptr;    // events coalesced because a client fell behind
  metrics::Counter* engine_step_errors = nullptr;
  metrics::Counter* retriever_fallback_steps = nullptr;
  metrics::Counter* retriever_reconnects = nullptr;
  metrics::Histogram* ttft = nullptr;           // seconds
  metrics::Histogram* tpot = nullptr;           // seconds per output token after the first
  metrics::Histogram* request_latency = nullptr;
  metrics::Histogram* retrieval_latency = nullptr;
  metrics::Gauge* queue_depth = nullptr;
  metrics::Gauge* running = nullptr;
  metrics::Gauge* active_calls = nullptr;
  metrics::Gauge* draining = nullptr;
  metrics::Gauge* tensor_parallel_ranks = nullptr;  // --tensor-parallel; memory gauges are rank 0's
  metrics::GaugeFamily* device_memory = nullptr;  // spc_device_memory_bytes{kind}
  metrics::Gauge* device_memory_peak = nullptr;
  metrics::Gauge* host_rss = nullptr;
  SparseMetrics sparse;  // SpeContext counters (zeros while dense)

  /// Counts one finished call under its gRPC status code name ("OK", "INVALID_ARGUMENT", ...).
  void CountRequest(const std::string& code);
  /// Refreshes the memory gauges from the backend's accounting and /proc/self/statm.
  void UpdateMemory(const MemoryReport& report);
};

/// Registers every family. Errors only on a programming mistake (bad or duplicate names).
absl::StatusOr<GeneratorMetrics> RegisterGeneratorMetrics(metrics::Registry* registry);

/// "OK", "CANCELLED", ... for a gRPC status code number (google.rpc.Code).
std::string StatusCodeName(int code);

}  // namespace specontext::generator
