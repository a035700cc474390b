// Registry and text exposition: exact output for a small registry, escaping, histogram buckets,
// validation, and concurrent updates.
#include <cmath>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/metrics/exposition.h"
#include "core/metrics/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace specontext::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

uint64_t FreshSeed() {
  const uint64_t seed = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

TEST(ExpositionTest, ExactTextForASmallRegistry) {
  std::mt19937_64 rng(FreshSeed());
  const int ok = 1 + rng() % 1000, bad = 1 + rng() % 1000, depth = rng() % 100;
  Registry reg;
  auto* req = *reg.AddCounter("spc_requests_total", "Requests by status code.", {"code", "method"});
  auto* queue = *reg.AddGauge("spc_queue_depth", "Requests waiting.");
  auto* ttft =
      *reg.AddHistogram("spc_ttft_seconds", "Time to first token.", {"model"}, {0.5, 1, 2.5});
  (*req->WithLabels({"OK", "Generate"}))->Increment(ok);
  (*req->WithLabels({"INVALID_ARGUMENT", "Generate"}))->Increment(bad);
  (*queue->WithLabels({}))->Set(depth);
  Histogram* h = *ttft->WithLabels({"qwen3"});
  h->Observe(0.25);
  h->Observe(1.0);  // on a bound: counts in le="1"
  h->Observe(7.5);
  const std::string expected = absl::StrCat(
      "# HELP spc_requests_total Requests by status code.\n"
      "# TYPE spc_requests_total counter\n"
      "spc_requests_total{code=\"INVALID_ARGUMENT\",method=\"Generate\"} ",
      bad, "\n", "spc_requests_total{code=\"OK\",method=\"Generate\"} ", ok, "\n",
      "# HELP spc_queue_depth Requests waiting.\n"
      "# TYPE spc_queue_depth gauge\n"
      "spc_queue_depth ",
      depth, "\n",
      "# HELP spc_ttft_seconds Time to first token.\n"
      "# TYPE spc_ttft_seconds histogram\n"
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"0.5\"} 1\n"
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"1\"} 2\n"
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"2.5\"} 2\n"
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"+Inf\"} 3\n"
      "spc_ttft_seconds_sum{model=\"qwen3\"} 8.75\n"
      "spc_ttft_seconds_count{model=\"qwen3\"} 3\n");
  EXPECT_EQ(reg.Serialize(), expected);
}

TEST(ExpositionTest, EscapingAndValues) {
  EXPECT_EQ(EscapeLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  EXPECT_EQ(EscapeHelp("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");  // quotes stay in HELP
  EXPECT_EQ(FormatValue(0.1), "0.1");
  EXPECT_EQ(FormatValue(3), "3");
  EXPECT_EQ(FormatValue(-2.5), "-2.5");
  EXPECT_EQ(FormatValue(INFINITY), "+Inf");
  EXPECT_EQ(FormatValue(-INFINITY), "-Inf");
  EXPECT_EQ(FormatValue(NAN), "NaN");
  EXPECT_EQ(std::stod(FormatValue(1.0 / 3)), 1.0 / 3);  // round trips
  Registry reg;
  auto* c = *reg.AddCounter("spc_odd_total", "Help with \\ and\nnewline.", {"path"});
  (*c->WithLabels({"C:\\dir \"x\"\n"}))->Increment();
  EXPECT_EQ(reg.Serialize(),
            "# HELP spc_odd_total Help with \\\\ and\\nnewline.\n"
            "# TYPE spc_odd_total counter\n"
            "spc_odd_total{path=\"C:\\\\dir \\\"x\\\"\\n\"} 1\n");
}

TEST(ExpositionTest, HistogramBucketsMatchBruteForce) {
  std::mt19937_64 rng(FreshSeed());
  std::vector<double> bounds = LatencyBucketsSeconds();
  Registry reg;
  auto* fam = *reg.AddHistogram("spc_latency_seconds", "Latency.", {}, bounds);
  Histogram* h = *fam->WithLabels({});
  std::lognormal_distribution<double> dist(-4.0, 2.5);
  std::vector<double> values(1 + rng() % 2000);
  double sum = 0;
  for (double& v : values) {
    v = rng() % 10 == 0 ? bounds[rng() % bounds.size()] : dist(rng);  // some exactly on bounds
    h->Observe(v);
    sum += v;
  }
  h->Observe(NAN);  // ignored
  const Histogram::Snapshot s = h->Collect();
  ASSERT_EQ(s.cumulative.size(), bounds.size() + 1);
  for (size_t i = 0; i < bounds.size(); ++i) {
    const auto expect =
        std::count_if(values.begin(), values.end(), [&](double v) { return v <= bounds[i]; });
    EXPECT_EQ(s.cumulative[i], static_cast<uint64_t>(expect)) << "le=" << bounds[i];
  }
  EXPECT_EQ(s.cumulative.back(), values.size());
  EXPECT_EQ(s.count, values.size());
  EXPECT_NEAR(s.sum, sum, 1e-9 * std::abs(sum) + 1e-12);
  EXPECT_THAT(reg.Serialize(), HasSubstr(absl::StrCat("spc_latency_seconds_bucket{le=\"+Inf\"} ",
                                                      values.size(), "\n")));
}

TEST(RegistryTest, RejectsBadDefinitions) {
  Registry reg;
  EXPECT_FALSE(reg.AddCounter("1bad", "x").ok());
  EXPECT_FALSE(reg.AddCounter("has space", "x").ok());
  EXPECT_FALSE(reg.AddCounter("ok_total", "x", {"__reserved"}).ok());
  EXPECT_FALSE(reg.AddCounter("ok_total", "x", {"a", "a"}).ok());
  EXPECT_FALSE(reg.AddCounter("ok_total", "x", {"bad-label"}).ok());
  EXPECT_TRUE(reg.AddCounter("ok_total", "x", {"a"}).ok());
  EXPECT_THAT(reg.AddGauge("ok_total", "x").status().message(), HasSubstr("already registered"));
  EXPECT_FALSE(reg.AddHistogram("h_seconds", "x", {"le"}, {1}).ok());
  EXPECT_FALSE(reg.AddHistogram("h_seconds", "x", {}, {1, 1}).ok());
  EXPECT_FALSE(reg.AddHistogram("h_seconds", "x", {}, {2, 1}).ok());
  EXPECT_FALSE(reg.AddHistogram("h_seconds", "x", {}, {1, NAN}).ok());
  auto h = reg.AddHistogram("h_seconds", "x", {}, {1, 2, INFINITY});  // trailing +Inf dropped
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)->bounds().size(), 2u);
  auto* c = *reg.AddCounter("c_total", "x", {"a", "b"});
  EXPECT_EQ(c->WithLabels({"only one"}).status().code(), absl::StatusCode::kInvalidArgument);
  Counter* child = *c->WithLabels({"1", "2"});
  child->Increment(-5);  // counters never go down
  child->Increment(NAN);
  EXPECT_EQ(child->Value(), 0);
  EXPECT_EQ(*c->WithLabels({"1", "2"}), child);  // same child every time
  // A labelled family without children is not exported; an unlabelled one exports 0.
  const std::string text = reg.Serialize();
  EXPECT_THAT(text, Not(HasSubstr("ok_total")));
  EXPECT_THAT(text, HasSubstr("h_seconds_count 0\n"));
}

TEST(RegistryTest, ConcurrentUpdatesSumExactly) {
  Registry reg;
  auto* c = *reg.AddCounter("spc_tokens_total", "Tokens.", {"kind"});
  auto* g = *reg.AddGauge("spc_inflight", "In flight.");
  auto* h = *reg.AddHistogram("spc_step_seconds", "Step.", {}, {0.5});
  const uint64_t seed = FreshSeed();
  constexpr int kThreads = 8;
  std::vector<uint64_t> per_thread(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      const int n = 20000 + static_cast<int>(rng() % 5000);
      for (int i = 0; i < n; ++i) {
        const uint64_t inc = 1 + rng() % 3;
        // Children are looked up concurrently too; all threads share "prompt".
        (*c->WithLabels({i % 2 ? "prompt" : "generated"}))->Increment(static_cast<double>(inc));
        per_thread[t] += inc;
        (*g->WithLabels({}))->Increment();
        (*g->WithLabels({}))->Decrement();
        (*h->WithLabels({}))->Observe(i % 2 ? 0.25 : 0.75);
      }
    });
  }
  for (auto& th : threads) th.join();
  uint64_t total = 0;
  for (uint64_t v : per_thread) total += v;
  const double got =
      (*c->WithLabels({"prompt"}))->Value() + (*c->WithLabels({"generated"}))->Value();
  EXPECT_EQ(got, static_cast<double>(total));
  EXPECT_EQ((*g->WithLabels({}))->Value(), 0.0);
  const Histogram::Snapshot s = (*h->WithLabels({}))->Collect();
  EXPECT_EQ(s.count, s.cumulative.back());
  EXPECT_EQ(s.sum, 0.25 * s.cumulative[0] + 0.75 * (s.count - s.cumulative[0]));
}

}  // namespace
}  // namespace specontext::metrics
