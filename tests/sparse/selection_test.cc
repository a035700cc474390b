#include "core/sparse/selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::RandomF32;
using testing_sparse::SeedTrace;

// Double-precision softmax weights of query head h over rows [0, len) of KV head g.
std::vector<double> RefWeights(const SelectionQuery& s, int64_t h, int64_t g, float scale) {
  const int64_t hd = s.q.dim(1), cap = s.k_cache.dim(1);
  std::vector<double> w(s.len);
  double mx = -INFINITY;
  for (int64_t t = 0; t < s.len; ++t) {
    double dot = 0;
    for (int64_t e = 0; e < hd; ++e) dot += double(s.q.as<float>()[h * hd + e]) * s.k_cache.as<float>()[(g * cap + t) * hd + e];
    w[t] = dot * scale;
    mx = std::max(mx, w[t]);
  }
  double sum = 0;
  for (double& x : w) sum += (x = std::exp(x - mx));
  for (double& x : w) x /= sum;
  return w;
}

// Checks one sequence's sets against a double reference: sizes, sinks, top-B property (no unselected
// position beats a selected non-sink one beyond rounding), captured mass.
void CheckAgainstReference(const SelectionQuery& s, const SelectionResult& r, int seq, const SelectionOptions& o) {
  const int64_t n_q = s.q.dim(0), n_kv = s.k_cache.dim(0), group = n_q / n_kv, hd = s.q.dim(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool batch_level = o.mode == SelectionMode::kBatchLevel;
  const int32_t budget = s.budget ? s.budget : o.budget;
  std::vector<std::vector<double>> w(n_q);
  for (int64_t h = 0; h < n_q; ++h) w[h] = RefWeights(s, h, h / group, scale);
  for (int64_t g = 0; g < n_kv; ++g) {
    std::vector<double> comb(s.len, 0.0);
    for (int64_t h = 0; h < n_q; ++h) {
      if (!batch_level && h / group != g) continue;
      for (int64_t t = 0; t < s.len; ++t) comb[t] = std::max(comb[t], w[h][t]);
    }
    auto pos = r.sets.Positions(seq, g);
    const std::set<int32_t> chosen(pos.begin(), pos.end());
    ASSERT_EQ(pos.size(), static_cast<size_t>(std::min(budget, s.len)));
    ASSERT_EQ(chosen.size(), pos.size());
    for (int32_t p = 0; p < std::min({o.sink, budget, s.len}); ++p) EXPECT_TRUE(chosen.count(p)) << "sink " << p;
    double min_chosen = INFINITY, max_other = -INFINITY;
    for (int32_t t = 0; t < s.len; ++t) {
      if (t < o.sink) continue;
      if (chosen.count(t)) min_chosen = std::min(min_chosen, comb[t]);
      else max_other = std::max(max_other, comb[t]);
    }
    EXPECT_LE(max_other, min_chosen + 1e-6) << "kv head " << g;
    for (int64_t h = 0; h < n_q; ++h) {
      if (!batch_level && h / group != g) continue;
      double mass = 0;
      for (int32_t p : pos) mass += w[h][p];
      EXPECT_NEAR(r.captured_mass[seq * n_q + h], mass, 1e-5 + 1e-4 * mass) << "head " << h;
    }
  }
}

TEST(TopKPositions, MatchesFullSortWithTiesAndSinks) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t n = 1 + rng() % 300, k = 1 + rng() % 310, sink = rng() % 5;
    std::vector<float> scores(n);
    for (float& s : scores) s = static_cast<float>(rng() % 7);  // many ties
    std::vector<int32_t> got = {-5};  // appends after existing content
    TopKPositions(scores.data(), n, k, sink, &got);
    ASSERT_EQ(got[0], -5);
    got.erase(got.begin());
    // Reference: sinks, then full stable sort of the rest by score descending.
    std::vector<int32_t> want;
    const int32_t keep = std::min({sink, k, n});
    for (int32_t p = 0; p < keep; ++p) want.push_back(p);
    std::vector<int32_t> rest(n - keep);
    std::iota(rest.begin(), rest.end(), keep);
    std::stable_sort(rest.begin(), rest.end(), [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
    for (int32_t j = 0; j < std::min(k, n) - keep; ++j) want.push_back(rest[j]);
    std::sort(want.begin(), want.end());
    ASSERT_EQ(got, want) << "n=" << n << " k=" << k << " sink=" << sink;
  }
}

TEST(Selection, HeadLevelBatchOfDifferentLengths) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int64_t n_q = 12, n_kv = 3, hd = 17;
  SelectionOptions o;
  o.budget = 37;
  o.sink = 2;
  std::vector<SelectionQuery> batch;
  for (int32_t len : {0, 1, 36, 37, 38, 97, 2049}) {
    SelectionQuery s;
    s.q = RandomF32(rng, {n_q, hd}, -3, 3);  // peaky softmax, so the top-B property is meaningful
    s.k_cache = RandomF32(rng, {n_kv, len + 5, hd});
    s.len = len;
    batch.push_back(s);
  }
  batch[5].budget = 50;  // per-request override
  auto r = SelectTopB(batch, o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(ValidateIndexSets(r->sets).ok()) << ValidateIndexSets(r->sets);
  EXPECT_EQ(r->sets.sets_per_seq, n_kv);
  EXPECT_EQ(r->sets.budget, 50);
  for (size_t i = 0; i < batch.size(); ++i) {
    SCOPED_TRACE("seq " + std::to_string(i));
    EXPECT_EQ(r->sets.seq_len[i], batch[i].len);
    CheckAgainstReference(batch[i], *r, static_cast<int>(i), o);
    if (batch[i].len > 0 && batch[i].len <= o.budget) {
      for (int64_t h = 0; h < n_q; ++h) EXPECT_NEAR(r->captured_mass[i * n_q + h], 1.0, 1e-5);
    }
  }
  // The big sequence keeps less than all of its mass, and different KV heads choose differently.
  auto p0 = r->sets.Positions(6, 0), p1 = r->sets.Positions(6, 1);
  EXPECT_FALSE(std::equal(p0.begin(), p0.end(), p1.begin(), p1.end()));
}

TEST(Selection, BatchLevelSharesOneSetAcrossHeads) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int64_t n_q = 8, n_kv = 2, hd = 16;
  SelectionOptions o;
  o.budget = 64;
  o.mode = SelectionMode::kBatchLevel;
  std::vector<SelectionQuery> batch(2);
  for (int i = 0; i < 2; ++i) {
    batch[i].q = RandomF32(rng, {n_q, hd}, -3, 3);
    batch[i].k_cache = RandomF32(rng, {n_kv, 500, hd});
    batch[i].len = 300 + 111 * i;
  }
  auto r = SelectTopB(batch, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sets.sets_per_seq, 1);
  EXPECT_EQ(r->sets.n_sets(), 2);
  ASSERT_TRUE(ValidateIndexSets(r->sets).ok());
  for (int i = 0; i < 2; ++i) {
    auto a = r->sets.Positions(i, 0), b = r->sets.Positions(i, 1);
    EXPECT_EQ(a.data(), b.data());
    CheckAgainstReference(batch[i], *r, i, o);
  }
}

TEST(Selection, TiesPreferLowerPositions) {
  // Identical K rows give identical weights: the chosen non-sink rows must be the lowest positions.
  const int64_t hd = 8, len = 40;
  std::mt19937 rng(FreshSeed());
  SelectionQuery s;
  s.q = RandomF32(rng, {2, hd});
  s.k_cache = RandomF32(rng, {1, len, hd});
  for (int64_t t = 1; t < len; ++t) std::copy_n(s.k_cache.as<float>(), hd, s.k_cache.as<float>() + t * hd);
  s.len = len;
  SelectionOptions o;
  o.budget = 10;
  auto r = SelectTopB(std::span<const SelectionQuery>(&s, 1), o);
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(std::vector<int32_t>(r->sets.indices), ::testing::ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9));
  EXPECT_NEAR(r->captured_mass[0], 10.0 / len, 1e-5);
}

TEST(Selection, SinkIsKeptEvenWhenItScoresLowest) {
  const int64_t hd = 4, len = 100;
  std::mt19937 rng(FreshSeed());
  SelectionQuery s;
  s.q = RandomF32(rng, {1, hd}, 0.5f, 1.0f);
  s.k_cache = RandomF32(rng, {1, len, hd}, 0.0f, 1.0f);
  for (int64_t e = 0; e < hd; ++e) s.k_cache.as<float>()[e] = s.k_cache.as<float>()[hd + e] = -50.0f;
  s.len = len;
  SelectionOptions o;
  o.budget = 5;
  o.sink = 2;
  auto r = SelectTopB(std::span<const SelectionQuery>(&s, 1), o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->sets.indices[0], 0);
  EXPECT_EQ(r->sets.indices[1], 1);
  o.sink = 0;
  r = SelectTopB(std::span<const SelectionQuery>(&s, 1), o);
  ASSERT_TRUE(r.ok());
  EXPECT_GT(r->sets.indices[0], 1);
}

TEST(Selection, BadInputGivesClearErrors) {
  std::mt19937 rng(FreshSeed());
  SelectionQuery s;
  s.q = RandomF32(rng, {4, 8});
  s.k_cache = RandomF32(rng, {2, 10, 8});
  s.len = 10;
  auto one = std::span<const SelectionQuery>(&s, 1);
  SelectionOptions o;
  o.budget = 0;
  EXPECT_THAT(SelectTopB(one, o).status().message(), ::testing::HasSubstr("budget must be at least 1"));
  o.budget = 4;
  o.sink = 5;
  EXPECT_THAT(SelectTopB(one, o).status().message(), ::testing::HasSubstr("sink"));
  o.sink = 1;
  s.len = 11;
  EXPECT_THAT(SelectTopB(one, o).status().message(), ::testing::HasSubstr("len 11 outside"));
  s.len = 10;
  SelectionQuery bad = s;
  bad.k_cache = RandomF32(rng, {3, 10, 8});  // 4 query heads over 3 KV heads
  EXPECT_THAT(SelectTopB(std::span<const SelectionQuery>(&bad, 1), o).status().message(),
              ::testing::HasSubstr("multiple of n_kv_heads"));
  s.q.as<float>()[3] = NAN;
  EXPECT_THAT(SelectTopB(one, o).status().message(), ::testing::HasSubstr("non-finite"));
  EXPECT_FALSE(SelectTopB(std::span<const SelectionQuery>(), o).ok());
}

}  // namespace
}  // namespace specontext
