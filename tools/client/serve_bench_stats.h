// The figures of the serving benchmark (specontext-loadgen), named and defined as vLLM's
// benchmark_serving and NVIDIA genai-perf define them, so that their numbers and ours compare:
//
//   TTFT   time to first token: first token's arrival - the request's send time
//   E2EL   end-to-end latency: end of the stream (status received) - send time
//   ITL    inter-token latency: gap between consecutive output tokens of one request. A stream
//          message carrying k tokens counts as k tokens arriving when it arrives (one gap to the
//          previous message, then k - 1 gaps of 0), so a request of n tokens has n - 1 gaps.
//   TPOT   time per output token after the first: (E2EL - TTFT) / (output_tokens - 1), one value
//          per request of at least 2 tokens
//
// Summaries over the successful measured requests: mean, std (population), median and the 90th and
// 99th percentiles, with numpy's default linear interpolation (what both tools use). ITL is pooled
// over the gaps of all requests, TPOT/TTFT/E2EL are per request. Throughputs divide by the duration
// of the measured run: from its start to the end of its last request.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace specontext::client {

/// The p-th percentile (p in [0, 100]) of `values` by linear interpolation between the closest
/// ranks (numpy.percentile's default): rank p/100 * (n - 1) of the sorted values. 0 when empty.
double Percentile(std::vector<double> values, double p);

struct MetricSummary {
  int64_t count = 0;
  double mean = 0, std = 0, median = 0, p90 = 0, p99 = 0;
};
/// Count, mean, population std, median, p90 and p99 of `values` (all 0 when empty).
MetricSummary Summarize(const std::vector<double>& values);

/// One measured request. Times in seconds; send_s from the start of the measured run.
struct RequestRecord {
  int64_t index = 0;  // position in the plan
  double send_s = 0;
  double ttft_s = 0;          // 0 when no token arrived
  double latency_s = 0;       // E2EL
  int64_t prompt_tokens = 0;  // the server's count (usage), else the planned length
  int64_t output_tokens = 0;  // tokens streamed
  int64_t output_tokens_asked = 0;
  std::vector<double> itl_s;  // output_tokens - 1 gaps (fewer when the stream broke)
  int code = 0;               // grpc::StatusCode (HTTP: the HTTP status when code_name says so)
  std::string code_name;      // when set, the name of the failure instead of GrpcCodeName(code)
                              // ("HTTP_429" for an HTTP answer of status 429)
  std::string error;          // the status message when code != 0

  bool ok() const { return code == 0; }
  /// (latency - ttft) / (output_tokens - 1); 0 when fewer than 2 tokens.
  double tpot_s() const;
  /// code_name when set, else GrpcCodeName(code).
  std::string CodeName() const;
};

/// The name of a gRPC status code ("OK", "UNAVAILABLE", ...; "CODE_N" for unknown values).
std::string GrpcCodeName(int code);

struct BenchSummary {
  int64_t completed = 0;  // successful measured requests
  int64_t failed = 0;
  double duration_s = 0;
  int64_t total_input_tokens = 0;  // over completed requests
  int64_t total_output_tokens = 0;
  double request_throughput = 0;      // completed / duration, req/s
  double output_throughput = 0;       // total_output_tokens / duration, tok/s
  double total_token_throughput = 0;  // (input + output tokens) / duration, tok/s
  MetricSummary ttft_ms, tpot_ms, itl_ms, e2el_ms;
  std::map<std::string, int64_t> errors;  // failed requests by code name
};

/// The figures of `records` (the measured requests, failed ones included), with the run's duration
/// taken as the latest send_s + latency_s.
BenchSummary Summarize(const std::vector<RequestRecord>& records);

/// The summary line of the JSONL output: "type": "summary", the load (`config`'s mode,
/// concurrency, request_rate and max_concurrency, those it has), the figures (vLLM's key names:
/// request_throughput, mean_ttft_ms, p99_itl_ms, ...), errors by code name and `config`.
nlohmann::ordered_json SummaryJson(const BenchSummary& summary,
                                   const nlohmann::ordered_json& config);

/// One line per request: "type": "request", its record with times in ms.
nlohmann::ordered_json RequestJson(const RequestRecord& record);

/// The human table (vLLM's layout); `mode` is printed as the first line ("request rate 4 req/s").
std::string SummaryTable(const BenchSummary& summary, const std::string& mode);

}  // namespace specontext::client
