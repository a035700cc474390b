// The host-side step bookkeeping made allocation-free and O(B) for issue 4 must give exactly what the
// straightforward versions gave: SyntheticOverlap (bitmaps instead of a hash set, ordered read-out instead
// of a sort) draws the same sets from the same seed, and PlanElasticLoads (position->slot array, branch-free
// slot assignment, plan buffers reused across steps) makes the same slots and copies as a sorted merge.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/synthetic_overlap.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::RandomSets;

// The rewrite as first written (std::set for the taken positions, a sort at the end), same RNG calls.
class ReferenceRewrite {
 public:
  ReferenceRewrite(double overlap, uint64_t seed) : overlap_(overlap), rng_(seed) {}
  std::vector<int32_t> Rewrite(const std::vector<int32_t>& prev, int32_t len, int32_t size, int32_t sink) {
    std::vector<int32_t> out;
    std::set<int32_t> taken;
    size = std::max(0, std::min(size, len));
    const int32_t s0 = std::max(0, std::min({sink, size, len}));
    for (int32_t p = 0; p < s0; ++p) {
      out.push_back(p);
      taken.insert(p);
    }
    int32_t sink_in_prev = 0;
    std::vector<int32_t> pool;
    for (int32_t p : prev) {
      if (p < s0) {
        ++sink_in_prev;
      } else if (p < len) {
        pool.push_back(p);
        taken.insert(p);
      }
    }
    const int32_t want = static_cast<int32_t>(std::llround(overlap_ * size));
    const size_t from_prev = static_cast<size_t>(
        std::clamp<int64_t>(int64_t{want} - sink_in_prev, 0, std::min<int64_t>(pool.size(), size - s0)));
    ChooseFront(pool, from_prev);
    out.insert(out.end(), pool.begin(), pool.begin() + from_prev);
    const int64_t fresh_needed = size - static_cast<int64_t>(out.size());
    const int64_t fresh_available = (len - s0) - static_cast<int64_t>(pool.size());
    if (fresh_needed > 0 && fresh_available <= 2 * fresh_needed) {
      std::vector<int32_t> fresh;
      for (int32_t p = s0; p < len; ++p) {
        if (!taken.count(p)) fresh.push_back(p);
      }
      const size_t take = static_cast<size_t>(std::min<int64_t>(fresh_needed, fresh.size()));
      ChooseFront(fresh, take);
      out.insert(out.end(), fresh.begin(), fresh.begin() + take);
      const size_t more = static_cast<size_t>(fresh_needed) - take;
      out.insert(out.end(), pool.begin() + from_prev, pool.begin() + from_prev + more);
    } else if (fresh_needed > 0) {
      for (int64_t added = 0; added < fresh_needed;) {
        const int32_t p = static_cast<int32_t>(rng_.Between(s0, len - 1));
        if (taken.insert(p).second) {
          out.push_back(p);
          ++added;
        }
      }
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  void ChooseFront(std::vector<int32_t>& v, size_t k) {
    for (size_t i = 0; i < k && i < v.size(); ++i) std::swap(v[i], v[rng_.Between(i, v.size() - 1)]);
  }
  double overlap_;
  SyntheticRng rng_;
};

TEST(HostPaths, SyntheticRewriteDrawsTheSameSetsAsTheReference) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(seed));
  std::mt19937 rng(seed);
  for (double overlap : {0.0, 0.1, 0.5, 0.85, 1.0}) {
    SyntheticOverlap fast(overlap, seed);
    ReferenceRewrite ref(overlap, seed);
    std::vector<int32_t> prev, got;
    for (int call = 0; call < 300; ++call) {
      // Lengths from a few positions (dense branch) to far more than 64 × size (the sorting read-out).
      const int32_t len = std::uniform_int_distribution<int32_t>(1, call % 3 == 0 ? 40 : 20000)(rng);
      const int32_t size = std::uniform_int_distribution<int32_t>(0, std::min(len, call % 5 == 0 ? 4 : 700))(rng);
      const int32_t sink = std::uniform_int_distribution<int32_t>(0, 5)(rng);
      const std::vector<int32_t> want = ref.Rewrite(prev, len, size, sink);
      fast.RewriteSet(prev, len, size, sink, &got);
      ASSERT_EQ(got, want) << "call " << call << " len " << len << " size " << size << " sink " << sink;
      // The next call's previous set: this one, or a random set of another length (the bitmaps must be
      // clean whatever the last call touched).
      if (call % 4 == 3) {
        prev = RandomSets(rng, {len + 50}, 1, 1, std::max(1, size), std::max(1, size)).indices;
      } else {
        prev = got;
      }
    }
  }
}

// The plan as first written: a sorted merge of S_last and S_now per set, free slots found by a scan.
void ReferencePlan(const std::vector<SlotMap>& maps, const IndexSets& sets, std::vector<int32_t>* slots,
                   std::vector<RowCopy>* copies, std::vector<int32_t>* copy_ptr, int64_t* kept) {
  slots->assign(sets.indices.size(), -1);
  copies->clear();
  copy_ptr->assign(1, 0);
  *kept = 0;
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
      const int32_t set = i * sets.sets_per_seq + s;
      std::span<const int32_t> now = sets.SetPositions(set);
      std::vector<uint8_t> used(maps[i].budget(), 0);
      for (size_t j = 0; j < now.size(); ++j) {
        const int32_t sl = maps[i].SlotOf(s, now[j]);
        if (sl >= 0) {
          (*slots)[sets.indptr[set] + j] = sl;
          used[sl] = 1;
          ++*kept;
        }
      }
      int32_t next = 0;
      for (size_t j = 0; j < now.size(); ++j) {
        int32_t& sl = (*slots)[sets.indptr[set] + j];
        if (sl >= 0) continue;
        while (used[next]) ++next;
        sl = next;
        used[next] = 1;
        copies->push_back({now[j], sl});
      }
      copy_ptr->push_back(static_cast<int32_t>(copies->size()));
    }
  }
}

class HostPlanTest : public ::testing::TestWithParam<int> {};

TEST_P(HostPlanTest, ReusedPlanEqualsTheMergeReferenceOverManySteps) {
  const bool batch_level = GetParam() == 1;
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(seed));
  std::mt19937 rng(seed);
  constexpr int32_t kKv = 4, kBudget = 48;
  const int32_t per_seq = batch_level ? 1 : kKv;
  std::vector<int32_t> lens = {30, 400, 97};
  std::vector<SlotMap> maps(lens.size(), SlotMap(per_seq, kBudget));
  std::vector<SlotMap*> ptrs;
  for (SlotMap& m : maps) ptrs.push_back(&m);
  std::vector<const SlotMap*> cptrs(ptrs.begin(), ptrs.end());
  ElasticPlan plan;  // reused, as the decoder does
  IndexSets sets = RandomSets(rng, lens, kKv, per_seq, kBudget);
  SyntheticOverlap overlap(0.6, seed);
  std::vector<PreviousSets> prev(lens.size());
  std::vector<PreviousSets*> prev_ptrs;
  for (PreviousSets& p : prev) prev_ptrs.push_back(&p);
  for (int step = 0; step < 40; ++step) {
    // Steps alternate between fresh random sets (any size) and overlapping rewrites of the last ones.
    if (step % 3 == 0) sets = RandomSets(rng, lens, kKv, per_seq, kBudget);
    ASSERT_TRUE(overlap.Apply(2, prev_ptrs, &sets).ok());
    std::vector<int32_t> slots, copy_ptr;
    std::vector<RowCopy> copies;
    int64_t kept = 0;
    ReferencePlan(maps, sets, &slots, &copies, &copy_ptr, &kept);
    ASSERT_TRUE(PlanElasticLoads(cptrs, sets, &plan).ok());
    absl::StatusOr<ElasticPlan> fresh = PlanElasticLoads(cptrs, sets);
    ASSERT_TRUE(fresh.ok()) << fresh.status();
    for (const ElasticPlan* p : {&plan, &*fresh}) {
      ASSERT_EQ(p->slots, slots) << "step " << step;
      ASSERT_EQ(p->copies.copy_ptr, copy_ptr);
      ASSERT_EQ(p->copies.copies.size(), copies.size());
      for (size_t c = 0; c < copies.size(); ++c) {
        ASSERT_EQ(p->copies.copies[c].token, copies[c].token);
        ASSERT_EQ(p->copies.copies[c].slot, copies[c].slot);
      }
      EXPECT_EQ(p->kept_rows, kept);
      EXPECT_EQ(p->set_rows, static_cast<int64_t>(sets.indices.size()));
      EXPECT_EQ(p->copies.head_rows, static_cast<int64_t>(copies.size()) * (batch_level ? kKv : 1));
      EXPECT_EQ(p->copies.full_reload_rows, static_cast<int64_t>(sets.indices.size()) * (batch_level ? kKv : 1));
    }
    CopyList full;
    FullReloadCopies(sets, plan.slots, &full);
    const CopyList full_ref = FullReloadCopies(sets, plan.slots);
    ASSERT_EQ(full.copy_ptr, full_ref.copy_ptr);
    ASSERT_EQ(full.copies.size(), sets.indices.size());
    for (size_t c = 0; c < full.copies.size(); ++c) {
      ASSERT_EQ(full.copies[c].token, sets.indices[c]);
      ASSERT_EQ(full.copies[c].slot, plan.slots[c]);
    }
    ASSERT_TRUE(ApplyElasticPlan(plan, sets, ptrs).ok());
    for (int32_t& l : lens) l += 1 + static_cast<int32_t>(rng() % 3);
    for (size_t i = 0; i < lens.size(); ++i) sets.seq_len[i] = lens[i];
  }
}

INSTANTIATE_TEST_SUITE_P(HeadAndBatchLevel, HostPlanTest, ::testing::Values(0, 1));

// ApplyElasticPlan swaps in the state planning left in the maps' back buffers; when another plan of the
// same maps overwrote them, it must commit its own plan's sets (the copying path), never the other's.
TEST(HostPaths, ApplyCommitsItsOwnPlanWhicheverPlanWasMadeLast) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(seed));
  std::mt19937 rng(seed);
  constexpr int32_t kKv = 4, kBudget = 64;
  const std::vector<int32_t> lens = {70, 500, 130, 64};
  for (int32_t per_seq : {1, kKv}) {
    std::vector<SlotMap> fast(lens.size(), SlotMap(per_seq, kBudget)), slow = fast;
    auto ptrs = [](std::vector<SlotMap>& m) {
      std::vector<SlotMap*> p;
      for (SlotMap& x : m) p.push_back(&x);
      return p;
    };
    std::vector<SlotMap*> fp = ptrs(fast), sp = ptrs(slow);
    std::vector<const SlotMap*> cfp(fp.begin(), fp.end()), csp(sp.begin(), sp.end());
    for (int step = 0; step < 12; ++step) {
      const IndexSets a = RandomSets(rng, lens, kKv, per_seq, kBudget);
      const IndexSets b = RandomSets(rng, lens, kKv, per_seq, kBudget);
      ElasticPlan pa_fast, pa_slow, pb;
      ASSERT_TRUE(PlanElasticLoads(cfp, a, &pa_fast).ok());
      ASSERT_TRUE(PlanElasticLoads(csp, a, &pa_slow).ok());
      ASSERT_TRUE(PlanElasticLoads(csp, b, &pb).ok());  // overwrites slow's back buffers with b's state
      ASSERT_EQ(pa_fast.slots, pa_slow.slots);
      ASSERT_TRUE(ApplyElasticPlan(pa_fast, a, fp).ok());
      ASSERT_TRUE(ApplyElasticPlan(pa_slow, a, sp).ok());
      for (size_t i = 0; i < lens.size(); ++i) {
        ASSERT_EQ(fast[i].generation(), slow[i].generation());
        for (int32_t s = 0; s < per_seq; ++s) {
          const std::span<const int32_t> want = a.SetPositions(static_cast<int32_t>(i) * per_seq + s);
          ASSERT_TRUE(std::equal(fast[i].tokens(s).begin(), fast[i].tokens(s).end(), want.begin(), want.end()));
          ASSERT_TRUE(std::equal(slow[i].tokens(s).begin(), slow[i].tokens(s).end(), want.begin(), want.end()));
          ASSERT_TRUE(std::equal(fast[i].slots(s).begin(), fast[i].slots(s).end(), slow[i].slots(s).begin(),
                                 slow[i].slots(s).end()));
        }
      }
      // b was planned against the state before a's commit: stale now.
      EXPECT_EQ(ApplyElasticPlan(pb, b, sp).code(), absl::StatusCode::kFailedPrecondition);
    }
  }
}

// PlanElasticLoads checks each set's positions inside its parallel loop; whatever the thread count it
// reports what ValidateIndexSets reports: the first bad set, in set order.
TEST(HostPaths, PlanAndValidateNameTheFirstBadSet) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(testing_sparse::SeedTrace(seed));
  std::mt19937 rng(seed);
  const std::vector<int32_t> lens(40, 5000);  // 320 sets of 512: above ParallelFor's inline threshold
  const IndexSets good = RandomSets(rng, lens, 8, 8, 512, 512);
  ASSERT_TRUE(ValidateIndexSets(good).ok());
  std::vector<SlotMap> maps(lens.size(), SlotMap(8, 512));
  std::vector<const SlotMap*> cmaps;
  for (const SlotMap& m : maps) cmaps.push_back(&m);
  ElasticPlan plan;
  ASSERT_TRUE(PlanElasticLoads(cmaps, good, &plan).ok());
  for (int trial = 0; trial < 20; ++trial) {
    IndexSets bad = good;
    const int32_t first = static_cast<int32_t>(rng() % bad.n_sets());
    const int32_t second = first + 1 + static_cast<int32_t>(rng() % 7);
    auto spoil = [&](int32_t set, int kind) {
      const int32_t b = bad.indptr[set], e = bad.indptr[set + 1];
      const int32_t j = b + 1 + static_cast<int32_t>(rng() % (e - b - 1));
      if (kind == 0) bad.indices[j] = bad.indices[j - 1];                        // repeated
      if (kind == 1) std::swap(bad.indices[j], bad.indices[j - 1]);              // descending
      if (kind == 2) bad.indices[e - 1] = bad.seq_len[set / bad.sets_per_seq];   // past the end
      if (kind == 3) bad.indices[b] = -1;                                        // negative
    };
    const int kind = trial % 4;
    spoil(first, kind);
    if (second < bad.n_sets()) spoil(second, (kind + 1) % 4);
    const absl::Status st = ValidateIndexSets(bad);
    ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr(absl::StrCat("set ", first, " ")))
        << st << " kind " << kind;
    EXPECT_EQ(PlanElasticLoads(cmaps, bad, &plan), st) << "kind " << kind;
  }
  // The failed plans left nothing for an apply to swap in: the good plan made before commits correctly.
  ASSERT_TRUE(PlanElasticLoads(cmaps, good, &plan).ok());
  std::vector<SlotMap*> ptrs;
  for (SlotMap& m : maps) ptrs.push_back(&m);
  ASSERT_TRUE(ApplyElasticPlan(plan, good, ptrs).ok());
  for (int32_t set = 0; set < good.n_sets(); ++set) {
    const std::span<const int32_t> want = good.SetPositions(set), got = maps[set / 8].tokens(set % 8);
    ASSERT_TRUE(std::equal(got.begin(), got.end(), want.begin(), want.end())) << "set " << set;
  }
  IndexSets big = good;
  big.budget = 511;  // every set one position over
  EXPECT_THAT(std::string(ValidateIndexSets(big).message()), ::testing::HasSubstr("set 0 has 512 positions"));
  IndexSets short_ptr = good;
  short_ptr.indptr.pop_back();
  EXPECT_FALSE(ValidateIndexSets(short_ptr).ok());
}

}  // namespace
}  // namespace specontext
