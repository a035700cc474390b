#include "core/sparse/elastic.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::SeedTrace;

constexpr uint8_t kSentinel = 0xA5;
constexpr int64_t kGuard = 4096;

// A tensor placed between two sentinel regions, its own bytes random.
struct Guarded {
  std::vector<uint8_t> mem;
  Tensor t;
  Guarded(std::mt19937& rng, DType dtype, Shape shape) {
    const size_t n = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
    mem.assign(n + 2 * kGuard, kSentinel);
    for (size_t i = 0; i < n; ++i) mem[kGuard + i] = static_cast<uint8_t>(rng());
    t = Tensor(mem.data() + kGuard, dtype, std::move(shape));
  }
  bool SentinelsIntact() const {
    const size_t n = t.nbytes();
    for (int64_t i = 0; i < kGuard; ++i) {
      if (mem[i] != kSentinel || mem[kGuard + n + i] != kSentinel) return false;
    }
    return true;
  }
};

const uint8_t* Row(const Tensor& t, int64_t g, int64_t row) {
  const int64_t rb = t.dim(2) * DTypeSize(t.dtype());
  return static_cast<const uint8_t*>(t.data()) + (g * t.dim(1) + row) * rb;
}

// Next step's set: keep a random share of the last one (positions still valid), add random new positions.
std::vector<int32_t> NextSet(std::mt19937& rng, std::span<const int32_t> last, int32_t len, int32_t budget) {
  std::set<int32_t> s;
  const int mode = rng() % 10;
  const double keep = mode == 0 ? 0.0 : (mode == 1 ? 1.0 : std::uniform_real_distribution<double>(0.5, 0.97)(rng));
  for (int32_t p : last) {
    if (p < len && std::uniform_real_distribution<double>(0, 1)(rng) < keep) s.insert(p);
  }
  const int32_t target = mode == 2 ? static_cast<int32_t>(rng() % (budget / 2 + 1)) : std::min(budget, len);
  int guard = 0;
  while (static_cast<int32_t>(s.size()) < std::min(target, len) && guard++ < 100000) s.insert(rng() % len);
  while (static_cast<int32_t>(s.size()) > target) s.erase(std::next(s.begin(), rng() % s.size()));
  return std::vector<int32_t>(s.begin(), s.end());
}

class ElasticProperty : public ::testing::TestWithParam<int32_t /*sets_per_seq is n_kv (0) or 1*/> {};

TEST_P(ElasticProperty, SlotBuffersEqualAFullReloadAfterAnySequenceOfSets) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int32_t n_seqs = 3, n_kv = 2, hd = 128, budget = 97, n_layers = 2, cap = 700;
  const int32_t sets_per_seq = GetParam() == 0 ? n_kv : 1;
  // Host KV per (layer, seq) in bf16 (256-byte rows) and guarded slot buffers.
  std::vector<std::vector<Guarded>> host_k(n_layers), host_v(n_layers), slot_k(n_layers), slot_v(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    for (int i = 0; i < n_seqs; ++i) {
      host_k[l].emplace_back(rng, DType::kBF16, Shape{n_kv, cap, hd});
      host_v[l].emplace_back(rng, DType::kBF16, Shape{n_kv, cap, hd});
      slot_k[l].emplace_back(rng, DType::kBF16, Shape{n_kv, budget, hd});
      slot_v[l].emplace_back(rng, DType::kBF16, Shape{n_kv, budget, hd});
    }
  }
  std::vector<SlotMap> maps(n_seqs, SlotMap(sets_per_seq, budget));
  std::vector<SlotMap*> map_ptrs;
  for (auto& m : maps) map_ptrs.push_back(&m);
  std::vector<int32_t> lens = {1, 50, 90};
  IndexSets last;
  last.Reset(n_seqs, n_kv, sets_per_seq, budget);
  last.indptr.assign(n_seqs * sets_per_seq + 1, 0);
  ElasticCounters counters;
  int64_t expect_loaded = 0;
  for (int step = 0; step < 80; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    IndexSets now;
    now.Reset(n_seqs, n_kv, sets_per_seq, budget);
    for (int i = 0; i < n_seqs; ++i) {
      lens[i] = std::min<int32_t>(cap, lens[i] + rng() % 12);  // the sequences grow
      now.seq_len[i] = lens[i];
      for (int s = 0; s < sets_per_seq; ++s) {
        auto set = NextSet(rng, last.n_sets() ? last.SetPositions(i * sets_per_seq + s) : std::span<const int32_t>(),
                           lens[i], budget);
        std::vector<int32_t> added;
        auto prev = last.SetPositions(i * sets_per_seq + s);
        std::set_difference(set.begin(), set.end(), prev.begin(), prev.end(), std::back_inserter(added));
        expect_loaded += static_cast<int64_t>(added.size()) * (sets_per_seq == 1 ? n_kv : 1);
        now.indices.insert(now.indices.end(), set.begin(), set.end());
        now.indptr.push_back(static_cast<int32_t>(now.indices.size()));
      }
    }
    auto plan = PlanElasticLoads(std::vector<const SlotMap*>(map_ptrs.begin(), map_ptrs.end()), now);
    ASSERT_TRUE(plan.ok()) << plan.status();
    counters.AddPlan(*plan);
    for (int l = 0; l < n_layers; ++l) {
      std::vector<LayerRows> rows;
      for (int i = 0; i < n_seqs; ++i) rows.push_back({host_k[l][i].t, host_v[l][i].t, slot_k[l][i].t, slot_v[l][i].t});
      ASSERT_TRUE(ExecuteCopiesCpu(plan->copies, rows, &counters).ok());
    }
    ASSERT_TRUE(ApplyElasticPlan(*plan, now, map_ptrs).ok());
    // Check: slots unique per set, every position's slot holds its host row, sentinels intact, and a
    // full reload into fresh buffers gives the same bytes.
    for (int l = 0; l < n_layers; ++l) {
      std::vector<Guarded> fresh_k, fresh_v;
      std::vector<LayerRows> rows;
      for (int i = 0; i < n_seqs; ++i) {
        fresh_k.emplace_back(rng, DType::kBF16, Shape{n_kv, budget, hd});
        fresh_v.emplace_back(rng, DType::kBF16, Shape{n_kv, budget, hd});
      }
      for (int i = 0; i < n_seqs; ++i) rows.push_back({host_k[l][i].t, host_v[l][i].t, fresh_k[i].t, fresh_v[i].t});
      ASSERT_TRUE(ExecuteCopiesCpu(FullReloadCopies(now, plan->slots), rows, nullptr).ok());
      for (int i = 0; i < n_seqs; ++i) {
        ASSERT_TRUE(slot_k[l][i].SentinelsIntact() && slot_v[l][i].SentinelsIntact());
        ASSERT_TRUE(fresh_k[i].SentinelsIntact() && fresh_v[i].SentinelsIntact());
        for (int g = 0; g < n_kv; ++g) {
          const int32_t set = now.SetIndex(i, g);
          std::set<int32_t> used;
          for (int32_t j = now.indptr[set]; j < now.indptr[set + 1]; ++j) {
            const int32_t slot = plan->slots[j], tok = now.indices[j];
            ASSERT_TRUE(slot >= 0 && slot < budget);
            ASSERT_TRUE(used.insert(slot).second) << "slot " << slot << " used twice";
            ASSERT_EQ(maps[i].SlotOf(set - i * sets_per_seq, tok), slot);
            ASSERT_EQ(std::memcmp(Row(slot_k[l][i].t, g, slot), Row(host_k[l][i].t, g, tok), hd * 2), 0);
            ASSERT_EQ(std::memcmp(Row(slot_v[l][i].t, g, slot), Row(host_v[l][i].t, g, tok), hd * 2), 0);
            ASSERT_EQ(std::memcmp(Row(slot_k[l][i].t, g, slot), Row(fresh_k[i].t, g, slot), hd * 2), 0);
            ASSERT_EQ(std::memcmp(Row(slot_v[l][i].t, g, slot), Row(fresh_v[i].t, g, slot), hd * 2), 0);
          }
        }
      }
    }
    last = now;
  }
  // Counters: rows loaded are exactly the set differences, K and V, for every layer.
  EXPECT_EQ(counters.steps, 80);
  EXPECT_EQ(counters.rows_loaded, 2 * n_layers * expect_loaded);
  EXPECT_EQ(counters.bytes_loaded, counters.rows_loaded * hd * 2);
  EXPECT_LT(counters.bytes_loaded, counters.bytes_full_reload);
  EXPECT_GT(counters.overlap_ratio(), 0.3);
  EXPECT_LE(counters.overlap_ratio(), 1.0);
}

INSTANTIATE_TEST_SUITE_P(HeadAndBatchLevel, ElasticProperty, ::testing::Values(0, 1));

IndexSets OneSet(std::vector<int32_t> pos, int32_t len, int32_t budget) {
  IndexSets s;
  s.Reset(1, 1, 1, budget);
  s.seq_len[0] = len;
  s.indices = std::move(pos);
  s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
  return s;
}

TEST(Elastic, KeptTokensKeepTheirSlotsAndNewOnesTakeFreedSlots) {
  SlotMap map(1, 10);
  std::vector<SlotMap*> maps = {&map};
  std::vector<const SlotMap*> cmaps = {&map};
  IndexSets a = OneSet({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 20, 10);
  auto p = PlanElasticLoads(cmaps, a);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->copies.copies.size(), 10u);
  EXPECT_EQ(p->overlap_ratio(), 0.0);
  ASSERT_TRUE(ApplyElasticPlan(*p, a, maps).ok());
  IndexSets b = OneSet({0, 2, 4, 6, 8, 11, 12, 13, 14, 15}, 20, 10);
  auto q = PlanElasticLoads(cmaps, b);
  ASSERT_TRUE(q.ok());
  EXPECT_DOUBLE_EQ(q->overlap_ratio(), 0.5);
  ASSERT_EQ(q->copies.copies.size(), 5u);
  // Tokens 0,2,4,6,8 stay in slots 0,2,4,6,8; 11..15 go to the freed slots 1,3,5,7,9.
  EXPECT_THAT(q->slots, ::testing::ElementsAre(0, 2, 4, 6, 8, 1, 3, 5, 7, 9));
  EXPECT_EQ(q->copies.copies[0].token, 11);
  EXPECT_EQ(q->copies.copies[0].slot, 1);
  ASSERT_TRUE(ApplyElasticPlan(*q, b, maps).ok());
  EXPECT_EQ(map.SlotOf(0, 13), 5);
  EXPECT_EQ(map.SlotOf(0, 1), -1);
}

TEST(Elastic, RefusesStaleAndMismatchedPlans) {
  SlotMap map(1, 4);
  std::vector<SlotMap*> maps = {&map};
  std::vector<const SlotMap*> cmaps = {&map};
  IndexSets a = OneSet({1, 3}, 5, 4);
  auto p = PlanElasticLoads(cmaps, a);
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE(ApplyElasticPlan(*p, a, maps).ok());
  EXPECT_EQ(ApplyElasticPlan(*p, a, maps).code(), absl::StatusCode::kFailedPrecondition);
  IndexSets big = OneSet({0, 1, 2, 3, 4}, 6, 5);
  EXPECT_THAT(PlanElasticLoads(cmaps, big).status().message(), ::testing::HasSubstr("more than its 4 slots"));
  SlotMap two(2, 4);
  std::vector<const SlotMap*> wrong = {&two};
  EXPECT_THAT(PlanElasticLoads(wrong, a).status().message(), ::testing::HasSubstr("has 2 sets"));
  EXPECT_FALSE(PlanElasticLoads(std::vector<const SlotMap*>{}, a).ok());
}

TEST(Elastic, CopyEngineChecksEveryRowBeforeCopying) {
  std::mt19937 rng(FreshSeed());
  Guarded hk(rng, DType::kF32, {1, 8, 4}), hv(rng, DType::kF32, {1, 8, 4});
  Guarded sk(rng, DType::kF32, {1, 3, 4}), sv(rng, DType::kF32, {1, 3, 4});
  const std::vector<uint8_t> before(sk.mem);
  CopyList cl;
  cl.n_seqs = 1, cl.n_kv_heads = 1, cl.sets_per_seq = 1, cl.budget = 3;
  cl.copy_ptr = {0, 2};
  cl.copies = {{1, 0}, {9, 1}};  // token 9 is past the 8-row host cache
  std::vector<LayerRows> rows = {{hk.t, hv.t, sk.t, sv.t}};
  EXPECT_THAT(ExecuteCopiesCpu(cl, rows, nullptr).message(), ::testing::HasSubstr("token 9"));
  EXPECT_EQ(sk.mem, before);  // nothing copied
  cl.copies = {{1, 0}, {2, 3}};
  EXPECT_THAT(ExecuteCopiesCpu(cl, rows, nullptr).message(), ::testing::HasSubstr("slot 3"));
  EXPECT_EQ(sk.mem, before);
  cl.copies = {{1, 0}, {2, 2}};
  ASSERT_TRUE(ExecuteCopiesCpu(cl, rows, nullptr).ok());
  EXPECT_EQ(std::memcmp(Row(sk.t, 0, 2), Row(hk.t, 0, 2), 16), 0);
  EXPECT_TRUE(sk.SentinelsIntact());
}

}  // namespace
}  // namespace specontext
