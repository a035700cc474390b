// specontext-loadgen: N concurrent Generate streams against a specontext-generator, bounded by a
// request count and a duration; reports throughput and p50/p90/p99 of request latency and TTFT.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/client_context.h>

#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/status_macros.h"
#include "proto/specontext.grpc.pb.h"
#include "tools/client/channel.h"

namespace specontext::client {
namespace {

struct Sample {
  double latency_s = 0;
  double ttft_s = 0;
  int64_t tokens = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  // Nearest rank.
  const size_t rank = static_cast<size_t>(std::max(1.0, std::ceil(p / 100.0 * v.size())));
  return v[std::min(rank, v.size()) - 1];
}

absl::Status Run(const Args& args) {
  ChannelOptions o;
  o.address = args.GetString("addr");
  o.tls_ca_path = args.GetString("tls-ca");
  ASSIGN_OR_RETURN(int64_t concurrency, args.GetInt("concurrency"));
  ASSIGN_OR_RETURN(int64_t max_requests, args.GetInt("requests"));
  ASSIGN_OR_RETURN(double duration_s, args.GetDouble("duration-s"));
  ASSIGN_OR_RETURN(int64_t max_new, args.GetInt("max-new-tokens"));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature"));
  if (concurrency < 1 || concurrency > 4096) return absl::InvalidArgumentError("--concurrency must be in [1, 4096]");
  if (max_requests < 1) return absl::InvalidArgumentError("--requests must be >= 1");
  if (duration_s <= 0) return absl::InvalidArgumentError("--duration-s must be > 0");
  ASSIGN_OR_RETURN(auto channel, MakeChannel(o));
  auto stub = v1::Generator::NewStub(channel);

  v1::GenerateRequest req;
  req.set_prompt(args.GetString("prompt"));
  req.set_max_new_tokens(static_cast<int32_t>(max_new));
  req.mutable_sampling()->set_temperature(static_cast<float>(temperature));
  req.set_ignore_eos(args.GetBool("ignore-eos"));

  std::atomic<int64_t> issued{0};
  absl::Mutex mu;
  std::vector<Sample> samples;
  std::vector<std::string> errors;
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Seconds(duration_s);
  std::vector<std::thread> workers;
  for (int64_t w = 0; w < concurrency; ++w) {
    workers.emplace_back([&, w] {
      while (absl::Now() < end && issued.fetch_add(1) < max_requests) {
        v1::GenerateRequest r = req;
        r.mutable_sampling()->set_seed(static_cast<uint64_t>(w));
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(duration_s * 1e3) + 60000));
        const absl::Time t0 = absl::Now();
        Sample s;
        auto reader = stub->Generate(&ctx, r);
        v1::GenerateResponse resp;
        while (reader->Read(&resp)) {
          if (s.tokens == 0 && resp.token_ids_size() > 0) s.ttft_s = absl::ToDoubleSeconds(absl::Now() - t0);
          s.tokens += resp.token_ids_size();
        }
        grpc::Status st = reader->Finish();
        s.latency_s = absl::ToDoubleSeconds(absl::Now() - t0);
        absl::MutexLock lock(&mu);
        if (st.ok()) {
          samples.push_back(s);
        } else {
          errors.push_back(absl::StrFormat("%d: %s", static_cast<int>(st.error_code()), st.error_message()));
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  const double wall_s = absl::ToDoubleSeconds(absl::Now() - start);

  std::vector<double> latency, ttft;
  int64_t tokens = 0;
  for (const Sample& s : samples) {
    latency.push_back(s.latency_s);
    ttft.push_back(s.ttft_s);
    tokens += s.tokens;
  }
  std::printf("requests_ok=%zu errors=%zu wall_s=%.3f\n", samples.size(), errors.size(), wall_s);
  std::printf("throughput_req_per_s=%.3f throughput_tokens_per_s=%.2f\n", samples.size() / wall_s, tokens / wall_s);
  std::printf("latency_s p50=%.4f p90=%.4f p99=%.4f\n", Percentile(latency, 50), Percentile(latency, 90),
              Percentile(latency, 99));
  std::printf("ttft_s p50=%.4f p90=%.4f p99=%.4f\n", Percentile(ttft, 50), Percentile(ttft, 90),
              Percentile(ttft, 99));
  for (size_t i = 0; i < std::min<size_t>(errors.size(), 5); ++i) std::printf("error: %s\n", errors[i].c_str());
  if (samples.empty()) return absl::UnavailableError("no request succeeded");
  return absl::OkStatus();
}

}  // namespace
}  // namespace specontext::client

int main(int argc, char** argv) {
  specontext::Args args;
  args.Define({"addr", "generator address HOST:PORT", false, false, "127.0.0.1:50051"});
  args.Define({"tls-ca", "PEM CA of the server certificate: use TLS", false, false, ""});
  args.Define({"concurrency", "concurrent streams", false, false, "8"});
  args.Define({"requests", "total requests at most", false, false, "64"});
  args.Define({"duration-s", "stop issuing requests after this many seconds", false, false, "60"});
  args.Define({"prompt", "prompt text", false, false, "Once upon a time"});
  args.Define({"max-new-tokens", "tokens per request", false, false, "64"});
  args.Define({"temperature", "0 = greedy", false, false, "0"});
  args.Define({"ignore-eos", "generate max-new-tokens every time", true, false, ""});
  absl::Status st = args.Parse(argc, argv);
  if (st.ok() && args.help_requested()) {
    std::fputs(specontext::CommandUsage("specontext-loadgen", args).c_str(), stdout);
    return 0;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "specontext-loadgen: %s\n\nflags:\n%s", std::string(st.message()).c_str(),
                 args.Usage().c_str());
    return 2;
  }
  st = specontext::client::Run(args);
  if (!st.ok()) {
    std::fprintf(stderr, "specontext-loadgen: error: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
