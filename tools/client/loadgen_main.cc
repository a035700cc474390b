// specontext-loadgen: the serving benchmark client of a specontext-generator. Closed loop
// (--concurrency N) or open loop (--request-rate R, Poisson arrivals), prompt and output lengths
// fixed or drawn from a distribution, figures named and defined as in vLLM's benchmark_serving and
// NVIDIA genai-perf (tools/client/serve_bench_stats.h): a table on stdout, JSONL with --out,
// progress on stderr. Exit 0 when every measured request succeeded, 1 on a failed request or an
// unreachable server, 2 on bad flags.
#include <grpcpp/client_context.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/cli/args.h"
#include "core/status_grpc.h"
#include "core/status_macros.h"
#include "proto/specontext.grpc.pb.h"
#include "tools/client/channel.h"
#include "tools/client/serve_bench_http.h"
#include "tools/client/serve_bench_runner.h"
#include "tools/client/serve_bench_stats.h"
#include "tools/client/serve_bench_workload.h"

namespace specontext::client {
namespace {

void DefineFlags(Args& a) {
  a.Define({"api", "grpc (Generate streams) or http (POST /v1/completions, streamed)", false, false,
            "grpc"});
  a.Define({"addr", "generator address HOST:PORT (with --api http: its --http-port)", false, false,
            "127.0.0.1:50051"});
  a.Define({"info-addr",
            "with --api http: gRPC address HOST:PORT asked for the model's vocabulary, EOS ids and "
            "context (default: --addr's host, port 50051)",
            false, false, ""});
  a.Define({"tls-ca", "PEM CA of the server certificate: use TLS", false, false, ""});
  a.Define({"tls-cert", "PEM client certificate (mutual TLS)", false, false, ""});
  a.Define({"tls-key", "PEM key of --tls-cert", false, false, ""});
  a.Define({"tls-server-name", "name to check against the server certificate", false, false, ""});
  a.Define({"concurrency", "closed loop: requests in flight (default: 8 without --request-rate)",
            false, false, ""});
  a.Define({"request-rate", "open loop: Poisson arrivals at R requests/s, or inf (all at once)",
            false, false, ""});
  a.Define(
      {"max-concurrency", "open loop: most requests in flight (0 = no cap)", false, false, "0"});
  a.Define({"requests", "measured requests", false, false, "64"});
  a.Define(
      {"duration-s", "send no request after this many seconds (0 = no bound)", false, false, "0"});
  a.Define({"warmup-requests", "requests sent and awaited first, left out of the figures", false,
            false, "0"});
  a.Define({"prompt-tokens", "prompt length: N, uniform:A:B or normal:MEAN:STD (random token ids)",
            false, false, "32"});
  a.Define(
      {"output-tokens", "output length: N, uniform:A:B or normal:MEAN:STD", false, false, "64"});
  a.Define(
      {"prompt", "send this text as every prompt instead of random token ids", false, false, ""});
  a.Define({"allow-eos", "let requests stop at end-of-sequence (outputs may be shorter)", true,
            false, ""});
  a.Define({"ignore-eos", "generate the asked lengths (the default; kept for old command lines)",
            true, false, ""});
  a.Define({"temperature", "0 = greedy", false, false, "0"});
  a.Define({"seed", "seed of the workload (lengths, prompts, arrivals) and of sampling", false,
            false, "0"});
  a.Define({"budget", "sparse budget of every request (default: the server's)", false, false, ""});
  a.Define({"dense", "every request runs dense attention", true, false, ""});
  a.Define({"timeout-s", "deadline of each request in seconds", false, false, "300"});
  a.Define({"out", "write the results as JSONL to this file", false, false, ""});
  a.Define({"per-request", "with --out: one line per measured request after the summary", true,
            false, ""});
  a.Define({"quiet", "no progress lines on stderr", true, false, ""});
}

struct BenchConfig {
  bool http = false;   // --api http
  HttpTarget http_target;
  ChannelOptions channel;  // gRPC: the calls; HTTP: model info only
  int64_t concurrency = 0;  // > 0: closed loop
  double request_rate = 0;  // > 0 (or +inf): open loop
  int64_t max_concurrency = 0;
  int64_t requests = 0;
  double duration_s = 0;
  int64_t warmup_requests = 0;
  LengthDist prompt_tokens, output_tokens;
  std::string prompt_text;  // non-empty: text prompts
  bool ignore_eos = true;
  double temperature = 0;
  uint64_t seed = 0;
  int64_t budget = 0;  // 0 = the server's
  bool dense = false;
  double timeout_s = 0;
  std::string out;
  bool per_request = false;
  bool quiet = false;
};

absl::Status FlagError(const std::string& flag, const absl::Status& st) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, " ", st.message()));
}

// Every check of the flags; an error here is a usage error (exit 2).
absl::StatusOr<BenchConfig> ParseConfig(const Args& args) {
  if (!args.positional().empty()) {
    return absl::InvalidArgumentError("unexpected argument \"" + args.positional()[0] + "\"");
  }
  BenchConfig c;
  c.channel.address = args.GetString("addr");
  c.channel.tls_ca_path = args.GetString("tls-ca");
  c.channel.tls_cert_path = args.GetString("tls-cert");
  c.channel.tls_key_path = args.GetString("tls-key");
  c.channel.tls_server_name = args.GetString("tls-server-name");
  const std::string api = args.GetString("api");
  if (api != "grpc" && api != "http") return absl::InvalidArgumentError("--api must be grpc or http");
  c.http = api == "http";
  if (!c.http && !args.GetString("info-addr").empty()) {
    return absl::InvalidArgumentError("--info-addr needs --api http");
  }
  if (c.http) {
    auto target = ParseHttpAddress(c.channel.address);
    if (!target.ok()) return target.status();
    c.http_target = *target;
    c.http_target.tls_ca_path = c.channel.tls_ca_path;
    c.http_target.tls_cert_path = c.channel.tls_cert_path;
    c.http_target.tls_key_path = c.channel.tls_key_path;
    if (!c.channel.tls_server_name.empty()) {
      return absl::InvalidArgumentError("--tls-server-name is not supported with --api http");
    }
    const std::string info = args.GetString("info-addr");
    c.channel.address = info.empty() ? absl::StrCat(c.http_target.host.find(':') != std::string::npos
                                                         ? "[" + c.http_target.host + "]"
                                                         : c.http_target.host,
                                                     ":50051")
                                     : info;
  }
  const bool has_rate = !args.GetString("request-rate").empty();
  const bool has_concurrency = !args.GetString("concurrency").empty();
  if (has_rate && has_concurrency) {
    return absl::InvalidArgumentError(
        "--concurrency (closed loop) and --request-rate (open loop) exclude each other; "
        "use --max-concurrency to cap an open loop");
  }
  if (has_rate) {
    auto rate = ParseRequestRate(args.GetString("request-rate"));
    if (!rate.ok()) return FlagError("request-rate", rate.status());
    c.request_rate = *rate;
    ASSIGN_OR_RETURN(c.max_concurrency, args.GetInt("max-concurrency"));
    if (c.max_concurrency < 0) return absl::InvalidArgumentError("--max-concurrency must be >= 0");
  } else {
    if (args.GetString("max-concurrency") != "0") {
      return absl::InvalidArgumentError("--max-concurrency needs --request-rate");
    }
    c.concurrency = 8;
    if (has_concurrency) {
      ASSIGN_OR_RETURN(c.concurrency, args.GetInt("concurrency"));
    }
    if (c.concurrency < 1 || c.concurrency > 65536) {
      return absl::InvalidArgumentError("--concurrency must be in [1, 65536]");
    }
  }
  ASSIGN_OR_RETURN(c.requests, args.GetInt("requests"));
  if (c.requests < 1) return absl::InvalidArgumentError("--requests must be >= 1");
  ASSIGN_OR_RETURN(c.duration_s, args.GetDouble("duration-s"));
  if (!(c.duration_s >= 0) || std::isinf(c.duration_s)) {
    return absl::InvalidArgumentError("--duration-s must be a finite number >= 0");
  }
  ASSIGN_OR_RETURN(c.warmup_requests, args.GetInt("warmup-requests"));
  if (c.warmup_requests < 0) return absl::InvalidArgumentError("--warmup-requests must be >= 0");
  c.prompt_text = args.GetString("prompt");
  if (!c.prompt_text.empty() && args.Has("prompt-tokens")) {
    return absl::InvalidArgumentError("--prompt (text) and --prompt-tokens exclude each other");
  }
  auto prompt = ParseLengthDist(args.GetString("prompt-tokens"));
  if (!prompt.ok()) return FlagError("prompt-tokens", prompt.status());
  c.prompt_tokens = *prompt;
  auto output = ParseLengthDist(args.GetString("output-tokens"));
  if (!output.ok()) return FlagError("output-tokens", output.status());
  c.output_tokens = *output;
  if (args.GetBool("allow-eos") && args.GetBool("ignore-eos")) {
    return absl::InvalidArgumentError("--allow-eos and --ignore-eos exclude each other");
  }
  c.ignore_eos = !args.GetBool("allow-eos");
  ASSIGN_OR_RETURN(c.temperature, args.GetDouble("temperature"));
  if (!(c.temperature >= 0) || std::isinf(c.temperature)) {
    return absl::InvalidArgumentError("--temperature must be a finite number >= 0");
  }
  if (c.http && c.temperature > 2) {
    return absl::InvalidArgumentError("--temperature must be in [0, 2] with --api http (OpenAI's range)");
  }
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed"));
  c.seed = static_cast<uint64_t>(seed);
  c.dense = args.GetBool("dense");
  if (!args.GetString("budget").empty()) {
    ASSIGN_OR_RETURN(c.budget, args.GetInt("budget"));
    if (c.budget < 1) return absl::InvalidArgumentError("--budget must be >= 1");
    if (c.dense) return absl::InvalidArgumentError("--budget and --dense exclude each other");
  }
  ASSIGN_OR_RETURN(c.timeout_s, args.GetDouble("timeout-s"));
  if (!(c.timeout_s > 0) || c.timeout_s > 1e6) {
    return absl::InvalidArgumentError("--timeout-s must be in (0, 1e6]");
  }
  c.out = args.GetString("out");
  c.per_request = args.GetBool("per-request");
  if (c.per_request && c.out.empty())
    return absl::InvalidArgumentError("--per-request needs --out");
  c.quiet = args.GetBool("quiet");
  return c;
}

std::string ModeText(const BenchConfig& c) {
  if (c.concurrency > 0) return absl::StrCat("concurrency ", c.concurrency);
  std::string s = std::isinf(c.request_rate)
                      ? std::string("request rate inf (all at once)")
                      : absl::StrFormat("request rate %g req/s (Poisson)", c.request_rate);
  if (c.max_concurrency > 0) absl::StrAppend(&s, ", max concurrency ", c.max_concurrency);
  return s;
}

nlohmann::ordered_json ConfigJson(const BenchConfig& c, const v1::ModelInfo& info,
                                  int64_t clamped) {
  nlohmann::ordered_json j;
  j["api"] = c.http ? "http" : "grpc";
  j["mode"] = c.concurrency > 0 ? "concurrency" : "request_rate";
  if (c.concurrency > 0) {
    j["concurrency"] = c.concurrency;
  } else {
    // JSON has no infinity: "inf" as the flag writes it.
    j["request_rate"] = std::isinf(c.request_rate) ? nlohmann::ordered_json("inf")
                                                   : nlohmann::ordered_json(c.request_rate);
    j["max_concurrency"] = c.max_concurrency;
  }
  j["requests"] = c.requests;
  j["warmup_requests"] = c.warmup_requests;
  j["duration_s"] = c.duration_s;
  j["prompt_mode"] = c.prompt_text.empty() ? "token_ids" : "text";
  if (c.prompt_text.empty()) j["prompt_tokens"] = c.prompt_tokens.ToString();
  j["output_tokens"] = c.output_tokens.ToString();
  j["clamped_requests"] = clamped;
  j["ignore_eos"] = c.ignore_eos;
  j["temperature"] = c.temperature;
  j["seed"] = c.seed;
  if (c.budget > 0) j["budget"] = c.budget;
  j["dense"] = c.dense;
  j["timeout_s"] = c.timeout_s;
  j["model_name"] = info.model_name();
  j["backend"] = info.backend();
  j["vocab_size"] = info.vocab_size();
  j["max_context"] = info.max_context();
  j["server_default_budget"] = info.default_budget();
  return j;
}

// Plans `n` requests of `stream` and turns them into GenerateRequests.
absl::StatusOr<std::vector<v1::GenerateRequest>> BuildRequests(const BenchConfig& c,
                                                               const v1::ModelInfo& info, int64_t n,
                                                               uint64_t stream, int64_t* clamped) {
  WorkloadOptions w;
  w.n_requests = n;
  w.prompt = c.prompt_tokens;
  w.output = c.output_tokens;
  w.token_prompts = c.prompt_text.empty();
  w.vocab_size = info.vocab_size();
  w.excluded_ids.assign(info.eos_token_ids().begin(), info.eos_token_ids().end());
  w.max_context = info.max_context();
  w.seed = c.seed;
  w.stream = stream;
  ASSIGN_OR_RETURN(Workload plan, PlanWorkload(w));
  *clamped = plan.clamped;
  std::vector<v1::GenerateRequest> out(plan.requests.size());
  for (size_t i = 0; i < out.size(); ++i) {
    v1::GenerateRequest& r = out[i];
    if (w.token_prompts) {
      r.mutable_token_ids()->Assign(plan.requests[i].token_ids.begin(),
                                    plan.requests[i].token_ids.end());
    } else {
      r.set_prompt(c.prompt_text);
    }
    r.set_max_new_tokens(static_cast<int32_t>(
        std::min<int64_t>(plan.requests[i].output_tokens, std::numeric_limits<int32_t>::max())));
    r.set_ignore_eos(c.ignore_eos);
    r.mutable_sampling()->set_temperature(static_cast<float>(c.temperature));
    r.mutable_sampling()->set_seed(c.seed + i);
    if (c.budget > 0) r.mutable_sparsity()->set_budget(c.budget);
    r.mutable_sparsity()->set_dense(c.dense);
  }
  return out;
}

absl::Status WriteJsonl(const BenchConfig& c, const BenchSummary& summary,
                        const nlohmann::ordered_json& config,
                        const std::vector<RequestRecord>& records) {
  std::ofstream f(c.out, std::ios::trunc);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot write --out ", c.out));
  f << SummaryJson(summary, config).dump() << "\n";
  if (c.per_request) {
    for (const RequestRecord& r : records) f << RequestJson(r).dump() << "\n";
  }
  f.close();
  if (!f) return absl::DataLossError(absl::StrCat("writing --out ", c.out, " failed"));
  return absl::OkStatus();
}

// Why a run stopped sending (LoadResult::stop_code).
std::string StopReason(const BenchConfig& c, const LoadResult& r) {
  const std::string addr = c.http ? absl::StrCat(c.http_target.host, ":", c.http_target.port)
                                  : c.channel.address;
  if (r.stop_code == static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED)) {
    return absl::StrCat("a request to ", addr, " passed its deadline (--timeout-s ",
                        c.timeout_s,
                        ", DEADLINE_EXCEEDED): the generator stopped answering in time");
  }
  return absl::StrCat("the generator at ", addr, " became unavailable (UNAVAILABLE)");
}

absl::Status Run(const BenchConfig& c) {
  if (!c.out.empty() && !std::ofstream(c.out, std::ios::trunc)) {
    // Found out now, not after the run.
    return absl::NotFoundError(absl::StrCat("cannot write --out ", c.out));
  }
  ASSIGN_OR_RETURN(auto channel, MakeChannel(c.channel));
  auto stub = v1::Generator::NewStub(channel);
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    const grpc::Status st = stub->GetModelInfo(&ctx, v1::ModelInfoRequest(), &info);
    if (!st.ok()) {
      return absl::UnavailableError(
          absl::StrCat("cannot reach the generator at ", c.channel.address, ": ",
                       GrpcCodeName(static_cast<int>(st.error_code())), ": ", st.error_message()));
    }
  }
  if (c.http) RETURN_IF_ERROR(CheckHttpApi(c.http_target));
  int64_t clamped = 0, warmup_clamped = 0;
  ASSIGN_OR_RETURN(auto requests, BuildRequests(c, info, c.requests, 0, &clamped));
  ASSIGN_OR_RETURN(auto warmup, BuildRequests(c, info, c.warmup_requests, 1, &warmup_clamped));
  if (clamped > 0) {
    std::fprintf(stderr,
                 "specontext-loadgen: %lld requests cut to fit the server's context of %d\n",
                 static_cast<long long>(clamped), info.max_context());
  }

  LoadOptions load;
  load.concurrency = c.concurrency;
  load.max_concurrency = c.max_concurrency;
  load.timeout_s = c.timeout_s;
  load.progress = !c.quiet;
  if (!warmup.empty()) {
    // Warmup: the same load mode, all sent as soon as the cap allows; not timed.
    load.phase = "warmup";
    load.arrivals_s.assign(warmup.size(), 0.0);
    const LoadResult w =
        c.http ? RunLoadHttp(c.http_target, warmup, load) : RunLoad(stub.get(), warmup, load);
    if (w.stop_code != 0) {
      return absl::UnavailableError(absl::StrCat("the warmup stopped: ", StopReason(c, w)));
    }
  }
  if (c.concurrency == 0) {
    WorkloadRng arrivals(c.seed, 100);
    load.arrivals_s =
        PoissonArrivals(static_cast<int64_t>(requests.size()), c.request_rate, arrivals);
  }
  load.phase = "benchmark";
  load.duration_s = c.duration_s;
  const LoadResult result =
      c.http ? RunLoadHttp(c.http_target, requests, load) : RunLoad(stub.get(), requests, load);

  const BenchSummary summary = Summarize(result.records);
  const nlohmann::ordered_json config = ConfigJson(c, info, clamped);
  std::fputs(SummaryTable(summary, ModeText(c)).c_str(), stdout);
  std::fflush(stdout);
  if (!c.out.empty()) RETURN_IF_ERROR(WriteJsonl(c, summary, config, result.records));
  int shown = 0;
  for (const RequestRecord& r : result.records) {
    if (r.ok() || shown++ >= 5) continue;
    std::fprintf(stderr, "specontext-loadgen: request %lld: %s: %s\n",
                 static_cast<long long>(r.index), r.CodeName().c_str(), r.error.c_str());
  }
  if (result.stop_code != 0) {
    return absl::UnavailableError(absl::StrCat(StopReason(c, result), "; stopped with ",
                                               result.not_sent, " requests not sent"));
  }
  if (summary.failed > 0) {
    return absl::InternalError(
        absl::StrCat(summary.failed, " of ", result.records.size(), " requests failed"));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace specontext::client

int main(int argc, char** argv) {
  specontext::Args args;
  specontext::client::DefineFlags(args);
  absl::Status st = args.Parse(argc, argv);
  if (st.ok() && args.help_requested()) {
    std::fputs(specontext::CommandUsage("specontext-loadgen", args).c_str(), stdout);
    return 0;
  }
  absl::StatusOr<specontext::client::BenchConfig> config =
      st.ok() ? specontext::client::ParseConfig(args)
              : absl::StatusOr<specontext::client::BenchConfig>(st);
  if (!config.ok()) {
    std::fprintf(stderr, "specontext-loadgen: %s\n\nflags:\n%s",
                 std::string(config.status().message()).c_str(), args.Usage().c_str());
    return 2;
  }
  st = specontext::client::Run(*config);
  if (!st.ok()) {
    std::fprintf(stderr, "specontext-loadgen: error: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
