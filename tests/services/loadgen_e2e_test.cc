// End to end: specontext-loadgen (the serving benchmark client) against the real
// specontext-generator on the tiny stories260K model, in both load modes, read back from its JSONL;
// bad flags, an unreachable server and a server killed mid-run.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "tests/common/cli_runner.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

using nlohmann::json;

std::vector<std::string> ServerArgs() {
  const std::string dir = ModelDir();
  return {"--model",     dir + "/stories260K.bin",
          "--tokenizer", dir + "/tok512.bin",
          "--backend",   "cpu",
          "--threads",   "1",
          "--log-level", "warning",
          "--max-batch", "16",
          "--http-port", "0"};
}

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("spc_loadgen_" + std::to_string(getpid()) + "_" + name))
      .string();
}

// The JSONL of a run: the summary line, then the request lines.
struct Results {
  json summary;
  std::vector<json> requests;
};

Results ReadResults(const std::string& path) {
  Results r;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    json j = json::parse(line);
    if (j["type"] == "summary") {
      EXPECT_TRUE(r.summary.is_null()) << "one summary line";
      EXPECT_TRUE(r.requests.empty()) << "the summary comes first";
      r.summary = j;
    } else {
      EXPECT_EQ(j["type"], "request");
      r.requests.push_back(j);
    }
  }
  return r;
}

class LoadgenE2E : public SharedGeneratorSuite {
 protected:
  static void SetUpTestSuite() { StartSharedServer(SPC_GENERATOR_BIN, ServerArgs()); }

  // Runs the loadgen with `flags` writing per-request JSONL; checks what holds in both modes.
  // With `http`, over the OpenAI-compatible HTTP API (--api http), model info over gRPC.
  Results RunAndCheck(std::vector<std::string> flags, int64_t n_requests, int64_t prompt_lo,
                      int64_t prompt_hi, int64_t out_lo, int64_t out_hi, bool http = false) {
    const std::string out = TempPath("out.jsonl");
    RemoveOnExit cleanup{out};
    const std::string addr =
        http ? "127.0.0.1:" + std::to_string(server_->http_port()) : server_->address();
    std::vector<std::string> args = {
        "--addr",     addr,                       "--out",       out,  "--per-request",
        "--requests", std::to_string(n_requests), "--timeout-s", "120"};
    if (http) args.insert(args.end(), {"--api", "http", "--info-addr", server_->address()});
    args.insert(args.end(), flags.begin(), flags.end());
    const CliRun run = RunCli(SPC_LOADGEN_BIN, args);
    EXPECT_EQ(run.exit_code, 0) << run.err;
    EXPECT_FALSE(absl::StrContains(run.err, "completed/issued")) << "--quiet: " << run.err;
    EXPECT_TRUE(absl::StrContains(run.out, "Serving Benchmark Result")) << run.out;
    Results r = ReadResults(out);
    EXPECT_EQ(r.summary["config"]["api"], http ? "http" : "grpc");
    EXPECT_EQ(r.summary["completed"], n_requests);
    EXPECT_EQ(r.summary["failed"], 0);
    EXPECT_TRUE(r.summary["errors"].empty());
    EXPECT_EQ(r.requests.size(), static_cast<size_t>(n_requests));
    int64_t output_total = 0, prompt_total = 0;
    for (size_t i = 0; i < r.requests.size(); ++i) {
      const json& q = r.requests[i];
      EXPECT_EQ(q["index"], static_cast<int64_t>(i));
      EXPECT_EQ(q["code"], "OK") << q.dump();
      EXPECT_GT(q["ttft_ms"].get<double>(), 0) << q.dump();
      EXPECT_LE(q["ttft_ms"].get<double>(), q["latency_ms"].get<double>()) << q.dump();
      // ignore_eos: every request generates the length it asked for, within the asked bounds.
      const int64_t tokens = q["output_tokens"];
      EXPECT_EQ(tokens, q["output_tokens_asked"].get<int64_t>()) << q.dump();
      EXPECT_GE(tokens, out_lo);
      EXPECT_LE(tokens, out_hi);
      EXPECT_EQ(q["itl_ms"].size(), static_cast<size_t>(tokens - 1)) << q.dump();
      const int64_t prompt = q["prompt_tokens"];
      EXPECT_GE(prompt, prompt_lo);
      EXPECT_LE(prompt, prompt_hi);
      output_total += tokens;
      prompt_total += prompt;
    }
    EXPECT_EQ(r.summary["total_output_tokens"], output_total);
    EXPECT_EQ(r.summary["total_input_tokens"], prompt_total);
    EXPECT_GT(r.summary["request_throughput"].get<double>(), 0);
    EXPECT_LE(r.summary["median_ttft_ms"].get<double>(), r.summary["p99_ttft_ms"].get<double>());
    EXPECT_LE(r.summary["mean_ttft_ms"].get<double>(), r.summary["mean_e2el_ms"].get<double>());
    return r;
  }

};

std::vector<int64_t> AskedOutputs(const Results& r) {
  std::vector<int64_t> v;
  for (const json& q : r.requests) v.push_back(q["output_tokens_asked"]);
  return v;
}

TEST_F(LoadgenE2E, ClosedAndOpenLoopServeTheSameWorkload) {
  const std::vector<std::string> workload = {"--prompt-tokens", "uniform:4:40", "--output-tokens",
                                             "uniform:2:24",    "--seed",       "5",
                                             "--quiet"};
  std::vector<std::string> closed = workload;
  closed.insert(closed.end(), {"--concurrency", "4", "--warmup-requests", "2"});
  const Results c = RunAndCheck(closed, 12, 4, 40, 2, 24);
  EXPECT_EQ(c.summary["config"]["mode"], "concurrency");
  EXPECT_EQ(c.summary["config"]["concurrency"], 4);
  EXPECT_EQ(c.summary["config"]["warmup_requests"], 2);

  std::vector<std::string> open = workload;
  open.insert(open.end(), {"--request-rate", "40", "--max-concurrency", "6"});
  const Results o = RunAndCheck(open, 12, 4, 40, 2, 24);
  EXPECT_EQ(o.summary["config"]["mode"], "request_rate");
  EXPECT_EQ(o.summary["config"]["request_rate"], 40.0);
  EXPECT_EQ(o.summary["request_rate"], 40.0);
  EXPECT_EQ(o.summary["max_concurrency"], 6);
  // Sent in plan order, at Poisson times: send times do not decrease.
  for (size_t i = 1; i < o.requests.size(); ++i) {
    EXPECT_GE(o.requests[i]["send_ms"].get<double>(), o.requests[i - 1]["send_ms"].get<double>());
  }
  // One seed, one workload, whatever the load mode.
  EXPECT_EQ(AskedOutputs(c), AskedOutputs(o));
}

// The same workload over the OpenAI-compatible HTTP API: streamed /v1/completions with token-id
// prompts, both load modes; the figures as over gRPC, the output counts the server's usage.
TEST_F(LoadgenE2E, HttpApiInBothLoadModes) {
  ASSERT_GT(server_->http_port(), 0) << "the generator has no HTTP port";
  const std::vector<std::string> workload = {"--prompt-tokens", "uniform:4:40", "--output-tokens",
                                             "uniform:2:24",    "--seed",       "5",
                                             "--quiet"};
  std::vector<std::string> closed = workload;
  closed.insert(closed.end(), {"--concurrency", "4", "--warmup-requests", "2"});
  const Results c = RunAndCheck(closed, 12, 4, 40, 2, 24, /*http=*/true);
  EXPECT_EQ(c.summary["config"]["mode"], "concurrency");

  std::vector<std::string> open = workload;
  open.insert(open.end(), {"--request-rate", "40", "--max-concurrency", "6"});
  const Results o = RunAndCheck(open, 12, 4, 40, 2, 24, /*http=*/true);
  EXPECT_EQ(o.summary["config"]["mode"], "request_rate");
  EXPECT_EQ(o.summary["max_concurrency"], 6);
  for (size_t i = 1; i < o.requests.size(); ++i) {
    EXPECT_GE(o.requests[i]["send_ms"].get<double>(), o.requests[i - 1]["send_ms"].get<double>());
  }
  EXPECT_EQ(AskedOutputs(c), AskedOutputs(o));
}

// An HTTP error answer is counted by its status: a budget past int32 is refused with a 400 by the
// HTTP API (gRPC's budget is an int64). A port that is not the HTTP API fails before the run.
TEST_F(LoadgenE2E, HttpErrorsAreCountedByStatus) {
  const std::string out = TempPath("http_err.jsonl");
  RemoveOnExit cleanup{out};
  const CliRun run = RunCli(
      SPC_LOADGEN_BIN,
      {"--api", "http", "--addr", "127.0.0.1:" + std::to_string(server_->http_port()),
       "--info-addr", server_->address(), "--requests", "3", "--concurrency", "2", "--budget",
       "3000000000", "--out", out, "--quiet", "--timeout-s", "60"});
  EXPECT_EQ(run.exit_code, 1) << run.err;
  EXPECT_TRUE(absl::StrContains(run.err, "HTTP_400")) << run.err;
  const Results r = ReadResults(out);
  EXPECT_EQ(r.summary["failed"], 3) << r.summary.dump();
  EXPECT_EQ(r.summary["errors"]["HTTP_400"], 3) << r.summary.dump();

  const CliRun wrong_port = RunCli(
      SPC_LOADGEN_BIN,
      {"--api", "http", "--addr", "127.0.0.1:" + std::to_string(server_->metrics_port()),
       "--info-addr", server_->address(), "--requests", "2", "--quiet"});
  EXPECT_EQ(wrong_port.exit_code, 1) << wrong_port.err;
  EXPECT_TRUE(absl::StrContains(wrong_port.err, "answers GET /v1/models with HTTP 404"))
      << wrong_port.err;
}

// HTTPS with a client certificate: --tls-ca/--tls-cert/--tls-key serve both the gRPC model-info
// call and the HTTP requests of a generator under mutual TLS.
TEST(LoadgenHttpTls, MutualTls) {
  if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed";
  const std::string certs = TempPath("certs");
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  int code = -1;
  RunCommand({"/bin/sh", "-c",
              "exec >/dev/null 2>&1; set -e; cd " + certs +
                  "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1"
                  " -subj /CN=ca"
                  "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr"
                  " -subj /CN=localhost"
                  "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
                  "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
                  " -out server.pem -days 1 -extfile san.ext"
                  "; openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr"
                  " -subj /CN=client"
                  "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
                  " -out client.pem -days 1"},
             &code);
  ASSERT_EQ(code, 0) << "openssl failed";
  std::vector<std::string> args = ServerArgs();
  args.insert(args.end(), {"--tls-cert", certs + "/server.pem", "--tls-key", certs + "/server.key",
                           "--tls-client-ca", certs + "/ca.pem"});
  ServerProcess server;
  const absl::Status st = server.Start(SPC_GENERATOR_BIN, args);
  ASSERT_TRUE(st.ok()) << st;
  const std::string out = TempPath("tls.jsonl");
  RemoveOnExit cleanup{out};
  const CliRun run = RunCli(
      SPC_LOADGEN_BIN,
      {"--api", "http", "--addr", "localhost:" + std::to_string(server.http_port()), "--info-addr",
       "localhost:" + std::to_string(server.grpc_port()), "--tls-ca", certs + "/ca.pem",
       "--tls-cert", certs + "/client.pem", "--tls-key", certs + "/client.key", "--requests", "6",
       "--concurrency", "3", "--output-tokens", "8", "--out", out, "--quiet"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  const Results r = ReadResults(out);
  EXPECT_EQ(r.summary["completed"], 6) << r.summary.dump();
  EXPECT_EQ(r.summary["total_output_tokens"], 48) << r.summary.dump();
}

TEST_F(LoadgenE2E, AllAtOnceAndNormalLengths) {
  const Results r = RunAndCheck({"--request-rate", "inf", "--prompt-tokens", "normal:16:4",
                                 "--output-tokens", "normal:12:3", "--quiet"},
                                10, 1, 512, 1, 512);
  EXPECT_EQ(r.summary["config"]["request_rate"], "inf");
}

TEST_F(LoadgenE2E, DurationBoundsTheRunAndProgressGoesToStderr) {
  const std::string out = TempPath("duration.jsonl");
  RemoveOnExit cleanup{out};
  const absl::Time start = absl::Now();
  const CliRun run = RunCli(
      SPC_LOADGEN_BIN, {"--addr", server_->address(), "--requests", "1000000", "--concurrency", "2",
                        "--output-tokens", "32", "--duration-s", "2.5", "--out", out});
  const double wall_s = absl::ToDoubleSeconds(absl::Now() - start);
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_LT(wall_s, 30) << "the run stops sending after --duration-s";
  EXPECT_TRUE(absl::StrContains(run.err, "completed/issued")) << run.err;
  EXPECT_TRUE(absl::StrContains(run.err, "output tok/s")) << run.err;
  const Results r = ReadResults(out);
  EXPECT_GT(r.summary["completed"].get<int64_t>(), 0);
  EXPECT_LT(r.summary["completed"].get<int64_t>(), 1000000);
  EXPECT_GE(r.summary["duration_s"].get<double>(), 1.0);
}

TEST_F(LoadgenE2E, TextPrompt) {
  const std::string out = TempPath("text.jsonl");
  RemoveOnExit cleanup{out};
  const CliRun run =
      RunCli(SPC_LOADGEN_BIN,
             {"--addr", server_->address(), "--prompt", "Once upon a time", "--output-tokens", "8",
              "--requests", "4", "--concurrency", "2", "--out", out});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  const Results r = ReadResults(out);
  EXPECT_EQ(r.summary["completed"], 4);
  EXPECT_EQ(r.summary["total_output_tokens"], 32);
  EXPECT_GT(r.summary["total_input_tokens"].get<int64_t>(), 0) << "the server's prompt count";
  EXPECT_TRUE(r.requests.empty()) << "no request lines without --per-request";
  EXPECT_EQ(r.summary["config"]["prompt_mode"], "text");
}

TEST(LoadgenFlags, BadFlagsExitTwoWithAMessage) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--concurrency", "0"}, "--concurrency"},
      {{"--concurrency", "4", "--request-rate", "2"}, "exclude each other"},
      {{"--request-rate", "0"}, "--request-rate"},
      {{"--request-rate", "fast"}, "--request-rate"},
      {{"--max-concurrency", "4"}, "--max-concurrency needs --request-rate"},
      {{"--prompt-tokens", "uniform:9:3"}, "--prompt-tokens"},
      {{"--output-tokens", "normal:5"}, "--output-tokens"},
      {{"--output-tokens", "0"}, "--output-tokens"},
      {{"--requests", "0"}, "--requests"},
      {{"--budget", "0"}, "--budget"},
      {{"--budget", "8", "--dense"}, "exclude each other"},
      {{"--per-request"}, "--per-request needs --out"},
      {{"--warmup-requests", "-1"}, "--warmup-requests"},
      {{"--no-such-flag"}, "unknown flag"},
      {{"stray"}, "unexpected argument"},
  };
  for (const auto& [flags, message] : cases) {
    const CliRun r = RunCli(SPC_LOADGEN_BIN, flags);
    EXPECT_EQ(r.exit_code, 2) << flags[0] << ": " << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, message)) << flags[0] << ": " << r.err;
  }
}

TEST(LoadgenFlags, UnwritableOutputFailsBeforeTheRun) {
  const CliRun r =
      RunCli(SPC_LOADGEN_BIN, {"--addr", "127.0.0.1:1", "--out", "/nonexistent/dir/x"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "cannot write --out /nonexistent/dir/x")) << r.err;
}

TEST(LoadgenFlags, UnreachableServerIsAClearError) {
  const CliRun r = RunCli(SPC_LOADGEN_BIN, {"--addr", "127.0.0.1:1", "--requests", "2"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "cannot reach the generator at 127.0.0.1:1")) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "UNAVAILABLE")) << r.err;
}

// Waits (at most 30 s) until the server has calls in flight.
void AwaitActiveCalls(const ServerProcess& server) {
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (absl::Now() < give_up) {
    auto body = FetchMetrics(server.metrics_port());
    if (body.ok() && MetricValue(*body, "spc_generator_active_calls").value_or(0) > 0) return;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

// Runs a long loadgen against `server`, sends `sig` to the server once calls are in flight, and
// checks that the loadgen ends within 60 s with exit 1, `message` on stderr, the summary written
// and `code` among its errors.
void ExpectRunEndsAfterSignal(ServerProcess& server, int sig, const std::string& message,
                              const std::string& code) {
  const std::string out = TempPath("stopped.jsonl");
  RemoveOnExit cleanup{out};
  auto run = std::async(std::launch::async, [&] {
    return RunCli(SPC_LOADGEN_BIN,
                  {"--addr", server.address(), "--requests", "100000", "--concurrency", "4",
                   "--output-tokens", "400", "--timeout-s", "3", "--out", out, "--quiet"});
  });
  AwaitActiveCalls(server);
  server.Signal(sig);
  ASSERT_EQ(run.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "the loadgen still runs 60 s after signal " << sig << " to its server";
  const CliRun r = run.get();
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, message)) << r.err;
  const Results results = ReadResults(out);
  ASSERT_FALSE(results.summary.is_null()) << "the summary is written despite the failure";
  EXPECT_GE(results.summary["errors"].value(code, 0), 1) << results.summary.dump();
  EXPECT_LT(results.summary["completed"].get<int64_t>(), 100000);
}

TEST(LoadgenServerGone, KilledServerEndsTheRunWithUnavailable) {
  if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  ASSERT_TRUE(server.Start(SPC_GENERATOR_BIN, ServerArgs()).ok());
  ExpectRunEndsAfterSignal(server, SIGKILL, "became unavailable", "UNAVAILABLE");
}

TEST(LoadgenServerGone, HungServerEndsTheRunAtTheDeadline) {
  if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  ASSERT_TRUE(server.Start(SPC_GENERATOR_BIN, ServerArgs()).ok());
  ExpectRunEndsAfterSignal(server, SIGSTOP, "passed its deadline", "DEADLINE_EXCEEDED");
  server.Signal(SIGCONT);  // let the harness stop it
}

}  // namespace
}  // namespace specontext::testing
