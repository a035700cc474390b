// The synthetic-overlap benchmark hook: rewritten sets keep the requested share of the previous step's
// positions, stay valid index sets (sizes, ascending, in range, sink kept), and are reproducible.
#include "core/sparse/synthetic_overlap.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <random>

#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::RandomSets;

double Overlap(std::span<const int32_t> now, const std::vector<int32_t>& prev) {
  int64_t kept = 0;
  for (int32_t p : now) kept += std::binary_search(prev.begin(), prev.end(), p);
  return now.empty() ? 1.0 : static_cast<double>(kept) / now.size();
}

TEST(SyntheticOverlap, KeepsTheRequestedShareAndValidSets) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(seed));
  std::mt19937 rng(seed);
  for (double want : {0.0, 0.5, 0.8, 0.9, 1.0}) {
    SyntheticOverlap so(want, seed);
    constexpr int32_t kB = 64, kKv = 4, kSink = 2;
    std::vector<int32_t> lens = {300, 1000, 97};
    std::vector<PreviousSets> prev(lens.size());
    std::vector<PreviousSets*> ptrs;
    for (auto& p : prev) ptrs.push_back(&p);
    double sum = 0;
    int64_t n = 0;
    for (int step = 0; step < 20; ++step) {
      IndexSets sets = RandomSets(rng, lens, kKv, kKv, kB, kB);
      const std::vector<PreviousSets> before = prev;
      ASSERT_TRUE(so.Apply(kSink, ptrs, &sets).ok());
      ASSERT_TRUE(ValidateIndexSets(sets).ok()) << ValidateIndexSets(sets);
      for (int32_t i = 0; i < sets.n_seqs; ++i) {
        for (int32_t g = 0; g < kKv; ++g) {
          auto pos = sets.Positions(i, g);
          ASSERT_EQ(static_cast<int32_t>(pos.size()), std::min(kB, lens[i]));
          // The first step only records the real selection (here random sets without a sink).
          for (int32_t s = 0; s < kSink && step > 0; ++s) EXPECT_EQ(pos[s], s) << "the sink is always kept";
          EXPECT_TRUE(std::equal(pos.begin(), pos.end(), prev[i][g].begin(), prev[i][g].end()))
              << "the record holds the sets in effect";
          if (step > 0 && lens[i] > 2 * kB) {
            const double got = Overlap(pos, before[i][g]);
            // round(overlap · B) kept, the sink positions the previous set had counting among them; the other
            // sink positions are added (the first step's record is a random set that may lack them).
            int64_t sink_prev = 0;
            for (int32_t p : before[i][g]) sink_prev += p < kSink;
            const int64_t kept = sink_prev + std::clamp<int64_t>(std::llround(want * kB) - sink_prev, 0, kB - kSink);
            const double expect = static_cast<double>(kept) / kB;
            EXPECT_NEAR(got, expect, 1e-9) << "want " << want;
            sum += got;
            ++n;
          }
        }
      }
      for (int32_t& l : lens) l += 1;  // sequences grow by one token per step
    }
    EXPECT_NEAR(sum / n, want, 2.0 / kB + 1e-9);
  }
}

TEST(SyntheticOverlap, ShortSequencesAndReproducibility) {
  SyntheticOverlap a(0.5, 7), b(0.5, 7);
  std::vector<int32_t> prev = {0, 3, 4, 5, 9};
  std::vector<int32_t> x, y;
  // Only 10 positions exist: the fresh ones run out and previous positions fill in.
  a.RewriteSet(prev, 10, 8, 1, &x);
  b.RewriteSet(prev, 10, 8, 1, &y);
  EXPECT_EQ(x, y);
  ASSERT_EQ(x.size(), 8u);
  EXPECT_TRUE(std::is_sorted(x.begin(), x.end()));
  EXPECT_EQ(std::adjacent_find(x.begin(), x.end()), x.end());
  EXPECT_EQ(x.front(), 0);
  EXPECT_LT(x.back(), 10);
  // The whole past selected: the set is every position whatever the overlap.
  a.RewriteSet(prev, 6, 6, 1, &x);
  EXPECT_EQ(x, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  // Mismatched records are refused.
  IndexSets sets = testing_sparse::RandomSets(*std::make_unique<std::mt19937>(1), {50}, 2, 2, 8, 8);
  PreviousSets wrong(3);
  std::vector<PreviousSets*> ptr = {&wrong};
  EXPECT_FALSE(a.Apply(1, ptr, &sets).ok());
  std::vector<PreviousSets*> none;
  EXPECT_FALSE(a.Apply(1, none, &sets).ok());
}

TEST(SyntheticOverlap, RngDrawsEveryValueOfARangeEvenly) {
  const uint64_t seed = testing_sparse::FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(static_cast<uint32_t>(seed)));
  SyntheticRng rng(seed);
  for (uint64_t n : {1ull, 2ull, 7ull, 1000ull}) {
    const uint64_t lo = rng.Next() % 1000;
    std::vector<int64_t> hist(n, 0);
    const int64_t draws = static_cast<int64_t>(n) * 2000;
    for (int64_t d = 0; d < draws; ++d) {
      const uint64_t v = rng.Between(lo, lo + n - 1);
      ASSERT_GE(v, lo);
      ASSERT_LT(v, lo + n);
      ++hist[v - lo];
    }
    // Each value expected 2000 times: a fair draw stays within 6 sigma (sqrt(2000) ~ 45).
    for (uint64_t v = 0; v < n; ++v) EXPECT_NEAR(hist[v], 2000, 270) << "value " << v << " of " << n;
  }
  // A range near 2^64 still stays inside (the rejection threshold path).
  const uint64_t big_lo = 1, big_hi = ~uint64_t{0} - 1;
  for (int d = 0; d < 1000; ++d) {
    const uint64_t v = rng.Between(big_lo, big_hi);
    ASSERT_TRUE(v >= big_lo && v <= big_hi);
  }
  SyntheticRng a(42), b(42);
  for (int d = 0; d < 100; ++d) ASSERT_EQ(a.Next(), b.Next()) << "same seed, same stream";
}

TEST(SortedIntersectionSize, MatchesASetIntersectionOnRandomLists) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    auto draw = [&rng](int n, int range) {
      std::vector<int32_t> v;
      for (int i = 0; i < n; ++i) v.push_back(static_cast<int32_t>(rng() % range));
      std::sort(v.begin(), v.end());
      v.erase(std::unique(v.begin(), v.end()), v.end());
      return v;
    };
    const int range = 1 + static_cast<int>(rng() % 300);
    const std::vector<int32_t> a = draw(static_cast<int>(rng() % 100), range);
    const std::vector<int32_t> b = draw(static_cast<int>(rng() % 100), range);
    std::vector<int32_t> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    EXPECT_EQ(SortedIntersectionSize(a, b), static_cast<int64_t>(both.size()));
    EXPECT_EQ(SortedIntersectionSize(b, a), static_cast<int64_t>(both.size()));
  }
  EXPECT_EQ(SortedIntersectionSize({}, {}), 0);
}

}  // namespace
}  // namespace specontext
