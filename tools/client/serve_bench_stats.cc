#include "tools/client/serve_bench_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace specontext::client {

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return values[lo] + (values[hi] - values[lo]) * frac;
}

MetricSummary Summarize(const std::vector<double>& values) {
  MetricSummary s;
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  double sq = 0;
  for (double v : values) sq += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(sq / static_cast<double>(values.size()));
  s.median = Percentile(values, 50);
  s.p90 = Percentile(values, 90);
  s.p99 = Percentile(values, 99);
  return s;
}

double RequestRecord::tpot_s() const {
  if (output_tokens < 2) return 0;
  return (latency_s - ttft_s) / static_cast<double>(output_tokens - 1);
}

std::string GrpcCodeName(int code) {
  // absl::StatusCode shares the canonical numbering of grpc::StatusCode (google.rpc.Code).
  if (code < 0 || code > 16) return absl::StrCat("CODE_", code);
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

std::string RequestRecord::CodeName() const {
  return code_name.empty() ? GrpcCodeName(code) : code_name;
}

BenchSummary Summarize(const std::vector<RequestRecord>& records) {
  BenchSummary s;
  std::vector<double> ttft, tpot, itl, e2el;
  for (const RequestRecord& r : records) {
    s.duration_s = std::max(s.duration_s, r.send_s + r.latency_s);
    if (!r.ok()) {
      ++s.failed;
      ++s.errors[r.CodeName()];
      continue;
    }
    ++s.completed;
    s.total_input_tokens += r.prompt_tokens;
    s.total_output_tokens += r.output_tokens;
    e2el.push_back(r.latency_s * 1e3);
    if (r.output_tokens > 0) ttft.push_back(r.ttft_s * 1e3);
    if (r.output_tokens > 1) tpot.push_back(r.tpot_s() * 1e3);
    for (double g : r.itl_s) itl.push_back(g * 1e3);
  }
  if (s.duration_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / s.duration_s;
    s.output_throughput = static_cast<double>(s.total_output_tokens) / s.duration_s;
    s.total_token_throughput =
        static_cast<double>(s.total_input_tokens + s.total_output_tokens) / s.duration_s;
  }
  s.ttft_ms = Summarize(ttft);
  s.tpot_ms = Summarize(tpot);
  s.itl_ms = Summarize(itl);
  s.e2el_ms = Summarize(e2el);
  return s;
}

namespace {

void PutMetric(nlohmann::ordered_json& j, const std::string& name, const MetricSummary& m) {
  j["mean_" + name + "_ms"] = m.mean;
  j["std_" + name + "_ms"] = m.std;
  j["median_" + name + "_ms"] = m.median;
  j["p90_" + name + "_ms"] = m.p90;
  j["p99_" + name + "_ms"] = m.p99;
}

}  // namespace

nlohmann::ordered_json SummaryJson(const BenchSummary& s, const nlohmann::ordered_json& config) {
  nlohmann::ordered_json j;
  j["type"] = "summary";
  // The load, also at the top level as vLLM writes it.
  for (const char* key : {"mode", "concurrency", "request_rate", "max_concurrency"}) {
    if (config.contains(key)) j[key] = config[key];
  }
  j["completed"] = s.completed;
  j["failed"] = s.failed;
  j["duration_s"] = s.duration_s;
  j["total_input_tokens"] = s.total_input_tokens;
  j["total_output_tokens"] = s.total_output_tokens;
  j["request_throughput"] = s.request_throughput;
  j["output_throughput"] = s.output_throughput;
  j["total_token_throughput"] = s.total_token_throughput;
  PutMetric(j, "ttft", s.ttft_ms);
  PutMetric(j, "tpot", s.tpot_ms);
  PutMetric(j, "itl", s.itl_ms);
  PutMetric(j, "e2el", s.e2el_ms);
  j["errors"] = nlohmann::ordered_json::object();
  for (const auto& [code, n] : s.errors) j["errors"][code] = n;
  j["config"] = config;
  return j;
}

nlohmann::ordered_json RequestJson(const RequestRecord& r) {
  nlohmann::ordered_json j;
  j["type"] = "request";
  j["index"] = r.index;
  j["send_ms"] = r.send_s * 1e3;
  j["ttft_ms"] = r.ttft_s * 1e3;
  j["latency_ms"] = r.latency_s * 1e3;
  j["tpot_ms"] = r.tpot_s() * 1e3;
  j["prompt_tokens"] = r.prompt_tokens;
  j["output_tokens"] = r.output_tokens;
  j["output_tokens_asked"] = r.output_tokens_asked;
  std::vector<double> itl_ms;
  itl_ms.reserve(r.itl_s.size());
  for (double g : r.itl_s) itl_ms.push_back(g * 1e3);
  j["itl_ms"] = itl_ms;
  j["code"] = r.CodeName();
  if (!r.ok()) j["error"] = r.error;
  return j;
}

namespace {

void Line(std::string* out, const std::string& label, const std::string& value) {
  absl::StrAppendFormat(out, "%-40s %s\n", label + ":", value);
}
void Header(std::string* out, const std::string& title) {
  const size_t width = 50, pad = width > title.size() ? (width - title.size()) / 2 : 0;
  absl::StrAppend(out, std::string(pad, '-'), title, std::string(width - pad - title.size(), '-'),
                  "\n");
}
void Metric(std::string* out, const std::string& name, const MetricSummary& m) {
  Line(out, absl::StrCat("Mean ", name, " (ms)"), absl::StrFormat("%.2f", m.mean));
  Line(out, absl::StrCat("Median ", name, " (ms)"), absl::StrFormat("%.2f", m.median));
  Line(out, absl::StrCat("P90 ", name, " (ms)"), absl::StrFormat("%.2f", m.p90));
  Line(out, absl::StrCat("P99 ", name, " (ms)"), absl::StrFormat("%.2f", m.p99));
}

}  // namespace

std::string SummaryTable(const BenchSummary& s, const std::string& mode) {
  std::string out;
  absl::StrAppend(&out, std::string(12, '='), " Serving Benchmark Result ", std::string(12, '='),
                  "\n");
  Line(&out, "Load", mode);
  Line(&out, "Successful requests", absl::StrCat(s.completed));
  Line(&out, "Failed requests", absl::StrCat(s.failed));
  Line(&out, "Benchmark duration (s)", absl::StrFormat("%.2f", s.duration_s));
  Line(&out, "Total input tokens", absl::StrCat(s.total_input_tokens));
  Line(&out, "Total generated tokens", absl::StrCat(s.total_output_tokens));
  Line(&out, "Request throughput (req/s)", absl::StrFormat("%.2f", s.request_throughput));
  Line(&out, "Output token throughput (tok/s)", absl::StrFormat("%.2f", s.output_throughput));
  Line(&out, "Total token throughput (tok/s)", absl::StrFormat("%.2f", s.total_token_throughput));
  Header(&out, "Time to First Token");
  Metric(&out, "TTFT", s.ttft_ms);
  Header(&out, "Time per Output Token (excl. 1st token)");
  Metric(&out, "TPOT", s.tpot_ms);
  Header(&out, "Inter-token Latency");
  Metric(&out, "ITL", s.itl_ms);
  Header(&out, "End-to-end Latency");
  Metric(&out, "E2EL", s.e2el_ms);
  if (!s.errors.empty()) {
    Header(&out, "Errors");
    for (const auto& [code, n] : s.errors) Line(&out, code, absl::StrCat(n));
  }
  absl::StrAppend(&out, std::string(50, '='), "\n");
  return out;
}

}  // namespace specontext::client
