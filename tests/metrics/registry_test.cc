// Registry on prometheus-cpp: the exposition of a small registry line by line (prometheus-cpp does
// not order children), escaping, histogram buckets, validation, and concurrent updates.
#include <algorithm>
#include <cmath>
#include <random>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/metrics/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace specontext::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::UnorderedElementsAreArray;

uint64_t FreshSeed() {
  const uint64_t seed = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

std::vector<std::string> Lines(const std::string& text) {
  EXPECT_TRUE(text.empty() || text.back() == '\n');
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// The value of the sample line that starts with `prefix` (name and labels), or NaN.
double Sample(const std::string& text, const std::string& prefix) {
  for (const std::string& line : Lines(text)) {
    if (line.rfind(prefix + " ", 0) == 0) {
      double v = NAN;
      EXPECT_TRUE(absl::SimpleAtod(line.substr(prefix.size() + 1), &v)) << line;
      return v;
    }
  }
  return NAN;
}

TEST(ExpositionTest, EveryLineOfASmallRegistry) {
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
  const std::vector<std::string> expected = {
      "# HELP spc_requests_total Requests by status code.",
      "# TYPE spc_requests_total counter",
      absl::StrCat("spc_requests_total{code=\"INVALID_ARGUMENT\",method=\"Generate\"} ", bad),
      absl::StrCat("spc_requests_total{code=\"OK\",method=\"Generate\"} ", ok),
      "# HELP spc_queue_depth Requests waiting.",
      "# TYPE spc_queue_depth gauge",
      absl::StrCat("spc_queue_depth ", depth),
      "# HELP spc_ttft_seconds Time to first token.",
      "# TYPE spc_ttft_seconds histogram",
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"0.5\"} 1",
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"1\"} 2",
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"2.5\"} 2",
      "spc_ttft_seconds_bucket{model=\"qwen3\",le=\"+Inf\"} 3",
      "spc_ttft_seconds_sum{model=\"qwen3\"} 8.75",
      "spc_ttft_seconds_count{model=\"qwen3\"} 3"};
  const std::string text = reg.Serialize();
  EXPECT_THAT(Lines(text), UnorderedElementsAreArray(expected)) << text;
  // Each family's HELP and TYPE come before its samples.
  EXPECT_LT(text.find("# TYPE spc_ttft_seconds"), text.find("spc_ttft_seconds_bucket"));
}

TEST(ExpositionTest, EscapingAndValues) {
  Registry reg;
  auto* c = *reg.AddCounter("spc_odd_total", "Help with \\ and\nnewline \"q\".", {"path"});
  (*c->WithLabels({"C:\\dir \"x\"\n"}))->Increment();
  auto* g = *reg.AddGauge("spc_values", "Values.", {"v"});
  (*g->WithLabels({"third"}))->Set(1.0 / 3);
  (*g->WithLabels({"inf"}))->Set(INFINITY);
  (*g->WithLabels({"neg"}))->Set(-2.5);
  const std::string text = reg.Serialize();
  EXPECT_THAT(text, HasSubstr("# HELP spc_odd_total Help with \\\\ and\\nnewline \"q\".\n"));
  EXPECT_THAT(text, HasSubstr("spc_odd_total{path=\"C:\\\\dir \\\"x\\\"\\n\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("spc_values{v=\"inf\"} +Inf\n"));
  EXPECT_THAT(text, HasSubstr("spc_values{v=\"neg\"} -2.5\n"));
  EXPECT_NEAR(Sample(text, "spc_values{v=\"third\"}"), 1.0 / 3, 1e-15);
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
  const std::string text = reg.Serialize();
  for (double b : bounds) {
    const auto expect =
        std::count_if(values.begin(), values.end(), [&](double v) { return v <= b; });
    EXPECT_EQ(Sample(text, absl::StrCat("spc_latency_seconds_bucket{le=\"", b, "\"}")),
              static_cast<double>(expect))
        << "le=" << b;
  }
  EXPECT_EQ(Sample(text, "spc_latency_seconds_bucket{le=\"+Inf\"}"),
            static_cast<double>(values.size()));
  EXPECT_EQ(Sample(text, "spc_latency_seconds_count"), static_cast<double>(values.size()));
  EXPECT_NEAR(Sample(text, "spc_latency_seconds_sum"), sum, 1e-9 * std::abs(sum) + 1e-12);
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
  EXPECT_THAT(reg.AddCounter("ok_total", "x", {"a"}).status().message(),
              HasSubstr("already registered"));
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
  EXPECT_EQ(child->Value(), 0);
  EXPECT_EQ(*c->WithLabels({"1", "2"}), child);  // same child every time
  // A labelled family without children is not exported; an unlabelled one exports 0.
  const std::string text = reg.Serialize();
  EXPECT_THAT(text, Not(HasSubstr("ok_total")));
  EXPECT_THAT(text, HasSubstr("h_seconds_count 0\n"));
  EXPECT_THAT(text, HasSubstr("h_seconds_bucket{le=\"+Inf\"} 0\n"));
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
  const prometheus::ClientMetric::Histogram s = (*h->WithLabels({}))->Collect().histogram;
  ASSERT_EQ(s.bucket.size(), 2u);  // le="0.5" and +Inf
  EXPECT_EQ(s.sample_count, s.bucket.back().cumulative_count);
  const uint64_t low = s.bucket[0].cumulative_count;
  EXPECT_EQ(s.sample_sum, 0.25 * low + 0.75 * (s.sample_count - low));
}

}  // namespace
}  // namespace specontext::metrics
