// The serving benchmark's pure parts (tools/client/serve_bench_{workload,stats}): length
// distributions, request rates, Poisson arrivals, workload plans, percentiles and the figures of a
// set of request records. Property checks over seeded random inputs.
#include "tools/client/serve_bench_stats.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "tools/client/serve_bench_workload.h"

namespace specontext::client {
namespace {

TEST(Percentile, MatchesNumpyLinearInterpolation) {
  // numpy.percentile([1, 2, 3, 4], [0, 50, 90, 99, 100]) = [1, 2.5, 3.7, 3.97, 4].
  const std::vector<double> v = {4, 1, 3, 2};
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 2.5);
  EXPECT_NEAR(Percentile(v, 90), 3.7, 1e-12);
  EXPECT_NEAR(Percentile(v, 99), 3.97, 1e-12);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
}

TEST(Percentile, MonotoneInPAndWithinRange) {
  std::mt19937_64 rng(17);
  for (int trial = 0; trial < 50; ++trial) {
    const size_t n = 1 + rng() % 97;
    std::vector<double> v(n);
    std::lognormal_distribution<double> d(0, 2);
    for (double& x : v) x = d(rng);
    const double lo = *std::min_element(v.begin(), v.end());
    const double hi = *std::max_element(v.begin(), v.end());
    double prev = -std::numeric_limits<double>::infinity();
    for (double p = 0; p <= 100; p += 0.5) {
      const double q = Percentile(v, p);
      EXPECT_GE(q, prev) << "n=" << n << " p=" << p;
      EXPECT_GE(q, lo);
      EXPECT_LE(q, hi);
      prev = q;
    }
    EXPECT_DOUBLE_EQ(Percentile(v, 0), lo);
    EXPECT_DOUBLE_EQ(Percentile(v, 100), hi);
    // The order of the input does not matter.
    std::vector<double> shuffled = v;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    EXPECT_DOUBLE_EQ(Percentile(shuffled, 90), Percentile(v, 90));
  }
}

TEST(Summarize, MeanStdAndPercentiles) {
  const MetricSummary s = Summarize(std::vector<double>{2, 4, 4, 4, 5, 5, 7, 9});
  EXPECT_EQ(s.count, 8);
  EXPECT_DOUBLE_EQ(s.mean, 5);
  EXPECT_DOUBLE_EQ(s.std, 2);  // population std
  EXPECT_DOUBLE_EQ(s.median, 4.5);
  EXPECT_LE(s.median, s.p90);
  EXPECT_LE(s.p90, s.p99);
  const MetricSummary empty = Summarize(std::vector<double>{});
  EXPECT_EQ(empty.count, 0);
  EXPECT_EQ(empty.mean, 0);
}

TEST(LengthDist, ParsesTheThreeForms) {
  auto fixed = ParseLengthDist("128");
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->kind, LengthDist::Kind::kFixed);
  EXPECT_EQ(fixed->ToString(), "128");
  auto uniform = ParseLengthDist("uniform:8:32");
  ASSERT_TRUE(uniform.ok()) << uniform.status();
  EXPECT_EQ(uniform->kind, LengthDist::Kind::kUniform);
  EXPECT_EQ(uniform->ToString(), "uniform:8:32");
  auto normal = ParseLengthDist("normal:100:25.5");
  ASSERT_TRUE(normal.ok()) << normal.status();
  EXPECT_EQ(normal->kind, LengthDist::Kind::kNormal);
  EXPECT_EQ(normal->ToString(), "normal:100:25.5");
  EXPECT_TRUE(ParseLengthDist("uniform:5:5").ok());
  EXPECT_TRUE(ParseLengthDist("normal:1:0").ok());
}

TEST(LengthDist, RejectsBadText) {
  for (const char* bad : {"", "0", "-3", "abc", "1.5", "uniform:8", "uniform:0:4", "uniform:9:8",
                          "uniform:a:b", "normal:0:1", "normal:10:-1", "normal:nan:1",
                          "normal:10:inf", "poisson:3:4", "uniform:1:2:3", "2000000000"}) {
    auto d = ParseLengthDist(bad);
    ASSERT_FALSE(d.ok()) << "\"" << bad << "\" parsed";
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(LengthDist, DrawsStayWithinBounds) {
  WorkloadRng rng(97, 0);
  const LengthDist fixed = *ParseLengthDist("17");
  const LengthDist uniform = *ParseLengthDist("uniform:3:11");
  std::set<int64_t> seen;
  for (int i = 0; i < 5000; ++i) {
    EXPECT_EQ(fixed.Sample(rng), 17);
    const int64_t u = uniform.Sample(rng);
    EXPECT_GE(u, 3);
    EXPECT_LE(u, 11);
    seen.insert(u);
  }
  EXPECT_EQ(seen.size(), 9u) << "every value of [3, 11] is drawn";
  // A normal far from 1 keeps its mean; one near 1 is clamped, never below 1.
  const LengthDist wide = *ParseLengthDist("normal:500:50");
  const LengthDist low = *ParseLengthDist("normal:2:10");
  double sum = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    sum += static_cast<double>(wide.Sample(rng));
    EXPECT_GE(low.Sample(rng), 1);
  }
  EXPECT_NEAR(sum / n, 500, 2.0);  // std of the mean: 50 / sqrt(20000) = 0.35
}

TEST(RequestRate, ParsesNumbersAndInf) {
  EXPECT_DOUBLE_EQ(*ParseRequestRate("2.5"), 2.5);
  EXPECT_TRUE(std::isinf(*ParseRequestRate("inf")));
  EXPECT_TRUE(std::isinf(*ParseRequestRate("INF")));
  for (const char* bad : {"0", "-1", "abc", "nan", "", "1e999"}) {
    EXPECT_FALSE(ParseRequestRate(bad).ok()) << "\"" << bad << "\" parsed";
  }
}

TEST(PoissonArrivals, MeanGapIsOneOverRate) {
  for (double rate : {0.5, 4.0, 100.0}) {
    for (uint64_t seed = 0; seed < 5; ++seed) {
      WorkloadRng rng(seed, 100);
      const int64_t n = 20001;
      const std::vector<double> at = PoissonArrivals(n, rate, rng);
      ASSERT_EQ(at.size(), static_cast<size_t>(n));
      EXPECT_EQ(at[0], 0);
      double sum = 0, sq = 0;
      for (size_t i = 1; i < at.size(); ++i) {
        const double gap = at[i] - at[i - 1];
        ASSERT_GE(gap, 0);
        sum += gap;
        sq += gap * gap;
      }
      const double mean = sum / (n - 1);
      const double cv = std::sqrt(sq / (n - 1) - mean * mean) / mean;
      // std of the mean gap: (1/rate) / sqrt(20000) = 0.7% of it.
      EXPECT_NEAR(mean * rate, 1.0, 0.04) << "rate " << rate << " seed " << seed;
      EXPECT_NEAR(cv, 1.0, 0.05) << "exponential gaps: std == mean";
    }
  }
}

TEST(PoissonArrivals, InfiniteRateSendsAllAtOnceAndSeedsRepeat) {
  WorkloadRng rng(3, 100);
  for (double t : PoissonArrivals(50, std::numeric_limits<double>::infinity(), rng))
    EXPECT_EQ(t, 0);
  WorkloadRng a(42, 100), b(42, 100), c(43, 100);
  const std::vector<double> x = PoissonArrivals(100, 10, a);
  EXPECT_EQ(x, PoissonArrivals(100, 10, b));
  EXPECT_NE(x, PoissonArrivals(100, 10, c));
}

TEST(PlanWorkload, IdsInVocabularyAvoidExcludedAndLengthsAsDrawn) {
  WorkloadOptions o;
  o.n_requests = 200;
  o.prompt = *ParseLengthDist("uniform:1:97");
  o.output = *ParseLengthDist("normal:40:30");
  o.vocab_size = 17;
  o.excluded_ids = {2, 0, 16, 2, 99};  // duplicates and ids outside the vocabulary are harmless
  o.seed = 7;
  auto w = PlanWorkload(o);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->requests.size(), 200u);
  EXPECT_EQ(w->clamped, 0);
  std::set<int32_t> seen;
  for (const PlannedRequest& r : w->requests) {
    EXPECT_GE(r.prompt_tokens, 1);
    EXPECT_LE(r.prompt_tokens, 97);
    EXPECT_GE(r.output_tokens, 1);
    ASSERT_EQ(r.token_ids.size(), static_cast<size_t>(r.prompt_tokens));
    for (int32_t id : r.token_ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 17);
      EXPECT_NE(id, 0);
      EXPECT_NE(id, 2);
      EXPECT_NE(id, 16);
      seen.insert(id);
    }
  }
  EXPECT_EQ(seen.size(), 14u) << "every id that is not excluded is drawn";

  // Same seed, same plan; the lengths do not depend on the vocabulary.
  auto again = PlanWorkload(o);
  o.vocab_size = 50000;
  auto other_vocab = PlanWorkload(o);
  ASSERT_TRUE(again.ok() && other_vocab.ok());
  for (size_t i = 0; i < w->requests.size(); ++i) {
    EXPECT_EQ(again->requests[i].token_ids, w->requests[i].token_ids);
    EXPECT_EQ(other_vocab->requests[i].prompt_tokens, w->requests[i].prompt_tokens);
    EXPECT_EQ(other_vocab->requests[i].output_tokens, w->requests[i].output_tokens);
  }
}

TEST(PlanWorkload, CutsToTheContextAndCountsIt) {
  WorkloadOptions o;
  o.n_requests = 300;
  o.prompt = *ParseLengthDist("uniform:1:600");
  o.output = *ParseLengthDist("uniform:1:300");
  o.vocab_size = 512;
  o.max_context = 512;
  o.seed = 11;
  auto w = PlanWorkload(o);
  ASSERT_TRUE(w.ok()) << w.status();
  int64_t over = 0;
  for (const PlannedRequest& r : w->requests) {
    EXPECT_GE(r.prompt_tokens, 1);
    EXPECT_GE(r.output_tokens, 1);
    EXPECT_LE(r.prompt_tokens + r.output_tokens, 512);
    over += r.prompt_tokens + r.output_tokens == 512;
  }
  EXPECT_GT(w->clamped, 0);
  EXPECT_LE(w->clamped, over);
}

TEST(PlanWorkload, TextPromptsAndErrors) {
  WorkloadOptions o;
  o.n_requests = 10;
  o.output = *ParseLengthDist("12");
  o.token_prompts = false;
  auto text = PlanWorkload(o);  // no vocabulary needed
  ASSERT_TRUE(text.ok()) << text.status();
  for (const PlannedRequest& r : text->requests) {
    EXPECT_TRUE(r.token_ids.empty());
    EXPECT_EQ(r.output_tokens, 12);
  }
  o.token_prompts = true;
  o.vocab_size = 2;
  o.excluded_ids = {0, 1};
  EXPECT_EQ(PlanWorkload(o).status().code(), absl::StatusCode::kInvalidArgument);
}

RequestRecord Record(int64_t index, double send, double ttft, double latency, int64_t tokens) {
  RequestRecord r;
  r.index = index;
  r.send_s = send;
  r.ttft_s = ttft;
  r.latency_s = latency;
  r.prompt_tokens = 10;
  r.output_tokens = tokens;
  r.output_tokens_asked = tokens;
  for (int64_t i = 1; i < tokens; ++i) r.itl_s.push_back((latency - ttft) / (tokens - 1));
  return r;
}

TEST(SummarizeRecords, FiguresFollowTheirDefinitions) {
  std::vector<RequestRecord> records = {Record(0, 0.0, 0.1, 1.1, 11), Record(1, 0.5, 0.2, 2.2, 21),
                                        Record(2, 1.0, 0.3, 0.3, 1)};
  RequestRecord failed = Record(3, 2.0, 0, 0.5, 0);
  failed.code = 14;  // UNAVAILABLE
  failed.error = "gone";
  records.push_back(failed);
  records.push_back(failed);
  const BenchSummary s = Summarize(records);
  EXPECT_EQ(s.completed, 3);
  EXPECT_EQ(s.failed, 2);
  EXPECT_EQ(s.errors.at("UNAVAILABLE"), 2);
  EXPECT_DOUBLE_EQ(s.duration_s, 2.7);  // request 1 ends at 0.5 + 2.2
  EXPECT_EQ(s.total_output_tokens, 33);
  EXPECT_EQ(s.total_input_tokens, 30);
  EXPECT_DOUBLE_EQ(s.request_throughput, 3 / 2.7);
  EXPECT_DOUBLE_EQ(s.output_throughput, 33 / 2.7);
  EXPECT_DOUBLE_EQ(s.total_token_throughput, 63 / 2.7);
  // TPOT: (1.1 - 0.1) / 10 = 100 ms and (2.2 - 0.2) / 20 = 100 ms; the 1-token request has none.
  EXPECT_EQ(s.tpot_ms.count, 2);
  EXPECT_NEAR(s.tpot_ms.mean, 100, 1e-9);
  EXPECT_EQ(s.itl_ms.count, 30);  // pooled: 10 + 20 gaps
  EXPECT_NEAR(s.itl_ms.median, 100, 1e-9);
  EXPECT_EQ(s.ttft_ms.count, 3);
  EXPECT_NEAR(s.ttft_ms.mean, 200, 1e-9);
  EXPECT_EQ(s.e2el_ms.count, 3);
  EXPECT_NEAR(s.e2el_ms.median, 1100, 1e-9);
  EXPECT_DOUBLE_EQ(records[0].tpot_s(), 0.1);
  EXPECT_EQ(records[2].tpot_s(), 0);
}

TEST(SummaryJson, CarriesTheNamedFiguresAndConfig) {
  const BenchSummary s = Summarize({Record(0, 0.0, 0.1, 1.1, 11)});
  nlohmann::ordered_json config;
  config["mode"] = "concurrency";
  const nlohmann::ordered_json j = SummaryJson(s, config);
  EXPECT_EQ(j["type"], "summary");
  for (const char* key :
       {"completed", "failed", "duration_s", "request_throughput", "output_throughput",
        "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
        "errors"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(j["config"]["mode"], "concurrency");
  EXPECT_EQ(j["mode"], "concurrency") << "the load at the top level too";
  EXPECT_FALSE(j.contains("request_rate"));
  const nlohmann::ordered_json r = RequestJson(Record(4, 0.0, 0.1, 1.1, 11));
  EXPECT_EQ(r["type"], "request");
  EXPECT_EQ(r["code"], "OK");
  EXPECT_EQ(r["itl_ms"].size(), 10u);
  EXPECT_EQ(GrpcCodeName(4), "DEADLINE_EXCEEDED");
  EXPECT_EQ(GrpcCodeName(99), "CODE_99");
}

}  // namespace
}  // namespace specontext::client
