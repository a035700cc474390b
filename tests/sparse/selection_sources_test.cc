// The evaluation selection sources' references (core/sparse/selection_source.h, quest.h,
// attention_recall.h) against brute force written here from their definitions: window sets exactly;
// Quest page scores from explicit page minima/maxima in double, Quest sets by repeatedly taking the
// best remaining page; the recall log-sum-exps in double, recall 1 when the set holds every past
// token. Fresh random inputs at odd sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "core/sparse/attention_recall.h"
#include "core/sparse/quest.h"
#include "core/sparse/selection_source.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::RandomF32;
using testing_sparse::RandomSets;
using testing_sparse::SeedTrace;

TEST(SelectionSourceTest, NamesRoundTrip) {
  for (SelectionSource s : {SelectionSource::kHead, SelectionSource::kWindow,
                            SelectionSource::kOracle, SelectionSource::kQuest}) {
    auto parsed = ParseSelectionSource(SelectionSourceName(s));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, s);
  }
  EXPECT_FALSE(ParseSelectionSource("random").ok());
  EXPECT_TRUE(IsPerLayerSource(SelectionSource::kOracle) &&
              IsPerLayerSource(SelectionSource::kQuest));
  EXPECT_FALSE(IsPerLayerSource(SelectionSource::kHead) ||
               IsPerLayerSource(SelectionSource::kWindow));
}

TEST(SelectionSourceTest, WindowSetsAreSinkPlusMostRecent) {
  // lens, budgets; sink 3; 2 KV heads.
  const std::vector<int32_t> lens = {10, 4, 17, 3}, budgets = {6, 6, 5, 2};
  for (int32_t sets_per_seq : {2, 1}) {
    IndexSets s;
    WindowIndexSets(lens, budgets, 2, sets_per_seq, 3, &s);
    ASSERT_TRUE(ValidateIndexSets(s).ok());
    EXPECT_EQ(s.budget, 6);
    const std::vector<std::vector<int32_t>> want = {
        {0, 1, 2, 7, 8, 9},  // 3 sink + 3 most recent of 10
        {0, 1, 2, 3},        // the whole past (4 <= 6)
        {0, 1, 2, 15, 16},   // 3 sink + 2 most recent of 17
        {0, 1},              // budget 2 < sink 3: the first two only
    };
    for (int32_t i = 0; i < 4; ++i) {
      for (int32_t g = 0; g < 2; ++g) {
        auto p = s.Positions(i, g);
        EXPECT_EQ(std::vector<int32_t>(p.begin(), p.end()), want[i])
            << "seq " << i << " head " << g;
      }
    }
  }
}

// Brute force U of each page in double from explicit per-page minima and maxima.
std::vector<double> BrutePageScores(const float* q, const float* k, int len, int hd, int page) {
  std::vector<double> out;
  for (int t0 = 0; t0 < len; t0 += page) {
    double u = 0;
    for (int e = 0; e < hd; ++e) {
      double mn = 1e30, mx = -1e30;
      for (int t = t0; t < std::min(len, t0 + page); ++t) {
        mn = std::min<double>(mn, k[t * hd + e]);
        mx = std::max<double>(mx, k[t * hd + e]);
      }
      u += std::max(q[e] * mn, q[e] * mx);
    }
    out.push_back(u);
  }
  return out;
}

TEST(QuestTest, PageScoresMatchBruteForceAndBoundEveryKey) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (int len : {1, 15, 16, 97, 203}) {
    for (int page : {16, 5}) {
      const int hd = 24;
      Tensor q = RandomF32(rng, {hd}, -2, 2), k = RandomF32(rng, {len, hd});
      std::vector<float> u((len + page - 1) / page);
      QuestPageScores(q.as<float>(), k.as<float>(), len, hd, page, u.data());
      const std::vector<double> want = BrutePageScores(q.as<float>(), k.as<float>(), len, hd, page);
      ASSERT_EQ(u.size(), want.size());
      for (size_t p = 0; p < u.size(); ++p) {
        EXPECT_NEAR(u[p], want[p], 1e-4 + 1e-5 * std::abs(want[p]))
            << SeedTrace(seed) << " page " << p;
        for (int t = int(p) * page; t < std::min(len, int(p + 1) * page);
             ++t) {  // an upper bound of q·k
          double dot = 0;
          for (int e = 0; e < hd; ++e) dot += double(q.as<float>()[e]) * k.as<float>()[t * hd + e];
          EXPECT_LE(dot, want[p] + 1e-4);
        }
      }
    }
  }
}

// Quest's positions by brute force: the forced pages, then repeatedly the best remaining page
// (higher score, lower page on ties), each contributing its first past positions (< len) until k
// are taken.
std::vector<int32_t> BruteQuestPositions(const std::vector<double>& scores, int len, int page,
                                         int k, int sink) {
  k = std::min(k, len);
  const int keep = std::min(sink, k), n_pages = static_cast<int>(scores.size());
  std::vector<bool> used(n_pages, false);
  std::set<int32_t> out;
  auto take = [&](int p) {
    used[p] = true;
    for (int t = p * page; t < std::min(len, (p + 1) * page) && static_cast<int>(out.size()) < k;
         ++t)
      out.insert(t);
  };
  for (int p = 0; p * page < keep; ++p) take(p);
  while (static_cast<int>(out.size()) < k) {
    int best = -1;
    for (int p = 0; p < n_pages; ++p) {
      if (!used[p] && (best < 0 || scores[p] > scores[best])) best = p;
    }
    take(best);
  }
  return std::vector<int32_t>(out.begin(), out.end());
}

TEST(QuestTest, PagesToPositionsFollowsTheRule) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (int len : {7, 16, 32, 33, 97, 250}) {
    for (int rows :
         {len, len + 1}) {  // with the current token's row: its page may hold no past position
      for (int k : {1, 5, 16, 40, 300}) {
        for (int sink : {0, 1, 20}) {
          if (sink > k) continue;
          std::vector<float> scores((rows + 15) / 16);
          std::vector<double> dscores(scores.size());
          for (size_t p = 0; p < scores.size(); ++p)
            dscores[p] = scores[p] = static_cast<float>(rng() % 7);  // ties
          std::vector<int32_t> got;
          QuestPagesToPositions(scores.data(), len, rows, 16, k, sink, &got);
          EXPECT_EQ(got, BruteQuestPositions(dscores, len, 16, k, sink))
              << SeedTrace(seed) << " len " << len << " rows " << rows << " k " << k << " sink "
              << sink;
        }
      }
    }
  }
}

TEST(QuestTest, SelectTopBMatchesBruteForce) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const int n_kv = 2, group = 3, n_q = n_kv * group, hd = 20;
  const std::vector<int> lens = {97, 5, 161, 64}, budgets = {40, 0, 64, 20};
  for (int mode_current = 0; mode_current < 4; ++mode_current) {
    const SelectionMode mode =
        mode_current % 2 == 0 ? SelectionMode::kHeadLevel : SelectionMode::kBatchLevel;
    const bool with_current = mode_current >= 2;
    std::vector<Tensor> qs, ks;
    std::vector<SelectionQuery> batch;
    for (size_t i = 0; i < lens.size(); ++i) {
      qs.push_back(RandomF32(rng, {n_q, hd}, -2, 2));
      ks.push_back(RandomF32(rng, {n_kv, lens[i] + 3, hd}));
      batch.push_back({qs.back(), ks.back(), lens[i], budgets[i]});
    }
    SelectionOptions so;
    so.budget = 32;
    so.sink = 4;
    so.mode = mode;
    IndexSets got;
    ASSERT_TRUE(QuestSelectTopB(batch, so, 16, with_current, &got).ok());
    ASSERT_TRUE(ValidateIndexSets(got).ok());
    const int sets = mode == SelectionMode::kHeadLevel ? n_kv : 1,
              hps = mode == SelectionMode::kHeadLevel ? group : n_q;
    for (size_t i = 0; i < lens.size(); ++i) {
      const int len = lens[i], cap = lens[i] + 3, k = budgets[i] != 0 ? budgets[i] : so.budget;
      const int rows = len + (with_current ? 1 : 0);
      for (int s = 0; s < sets; ++s) {
        std::vector<double> comb((rows + 15) / 16, -1e300);
        for (int j = 0; j < hps; ++j) {
          const int h = s * hps + j, g = h / group;
          const std::vector<double> u = BrutePageScores(
              qs[i].as<float>() + h * hd, ks[i].as<float>() + g * cap * hd, rows, hd, 16);
          for (size_t p = 0; p < u.size(); ++p) comb[p] = std::max(comb[p], u[p]);
        }
        auto pos = got.SetPositions(static_cast<int32_t>(i) * sets + s);
        EXPECT_EQ(std::vector<int32_t>(pos.begin(), pos.end()),
                  BruteQuestPositions(comb, len, 16, k, so.sink))
            << SeedTrace(seed) << " seq " << i << " set " << s;
      }
    }
  }
}

TEST(AttentionRecallTest, LseMatchesBruteForceAndFullSetsGiveOne) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const int n_kv = 2, group = 4, n_q = n_kv * group, hd = 12;
  const std::vector<int32_t> lens = {1, 37, 113};
  for (int pass = 0; pass < 2; ++pass) {
    // pass 0: random sets; pass 1: every past position (recall 1).
    IndexSets sets = RandomSets(rng, lens, n_kv, n_kv, pass == 0 ? 50 : 200, pass == 0 ? -1 : 200);
    std::vector<Tensor> k;
    for (int32_t len : lens) k.push_back(RandomF32(rng, {n_kv, len + 2, hd}, -2, 2));
    AttentionRecallArgs a;
    a.sets = &sets;
    a.k = k;
    a.q = RandomF32(rng, {static_cast<int64_t>(lens.size()), n_q, hd}, -2, 2);
    a.scale = 0.7f;
    Tensor out = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(lens.size()), n_q, 2});
    ASSERT_TRUE(AttentionRecallCpu(a, &out).ok());
    for (size_t i = 0; i < lens.size(); ++i) {
      for (int h = 0; h < n_q; ++h) {
        const int g = h / group, cap = lens[i] + 2;
        std::vector<double> e(lens[i]);
        double all = 0, sel = 0;
        for (int t = 0; t < lens[i]; ++t) {
          double d = 0;
          for (int x = 0; x < hd; ++x)
            d += double(a.q.as<float>()[(i * n_q + h) * hd + x]) *
                 k[i].as<float>()[(g * cap + t) * hd + x];
          e[t] = std::exp(0.7 * d);
          all += e[t];
        }
        for (int32_t p : sets.Positions(static_cast<int32_t>(i), g)) sel += e[p];
        const float* o = out.as<float>() + (i * n_q + h) * 2;
        EXPECT_NEAR(o[0], std::log(all), 1e-5 * (1 + std::abs(std::log(all)))) << SeedTrace(seed);
        if (sel > 0) {
          EXPECT_NEAR(o[1], std::log(sel), 1e-5 * (1 + std::abs(std::log(sel)))) << SeedTrace(seed);
          const double recall = std::exp(double(o[1]) - o[0]);
          EXPECT_NEAR(recall, sel / all, 1e-5) << SeedTrace(seed);
          if (pass == 1) EXPECT_NEAR(recall, 1.0, 1e-6);
        } else {
          EXPECT_EQ(o[1], -INFINITY);
        }
      }
    }
  }
}

TEST(AttentionRecallTest, BadInputIsRefused) {
  std::mt19937 rng(1);
  IndexSets sets = RandomSets(rng, {10}, 2, 2, 4);
  std::vector<Tensor> k = {RandomF32(rng, {2, 5, 8})};  // 5 rows < 10 past
  AttentionRecallArgs a;
  a.sets = &sets;
  a.k = k;
  a.q = RandomF32(rng, {1, 4, 8});
  Tensor out = Tensor::HostEmpty(DType::kF32, {1, 4, 2});
  EXPECT_FALSE(AttentionRecallCpu(a, &out).ok());
  k[0] = RandomF32(rng, {2, 10, 8});
  EXPECT_TRUE(AttentionRecallCpu(a, &out).ok());
  Tensor bad = Tensor::HostEmpty(DType::kF32, {1, 4});
  EXPECT_FALSE(AttentionRecallCpu(a, &bad).ok());
}

}  // namespace
}  // namespace specontext
