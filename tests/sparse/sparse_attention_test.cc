#include "core/sparse/sparse_attention.h"

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "core/backend.h"
#include "core/sparse/elastic.h"
#include "core/sparse/selection.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::RandomF32;
using testing_sparse::RandomSets;
using testing_sparse::SeedTrace;

void ExpectClose(const Tensor& got, const std::vector<float>& want, float atol, float rtol) {
  ASSERT_EQ(got.numel(), static_cast<int64_t>(want.size()));
  for (int64_t i = 0; i < got.numel(); ++i) {
    const float g = got.as<float>()[i];
    ASSERT_TRUE(std::isfinite(g)) << "element " << i;
    ASSERT_NEAR(g, want[i], atol + rtol * std::fabs(want[i])) << "element " << i;
  }
}

struct Case {
  int64_t n_heads = 12, n_kv = 4, hd = 17;
  std::vector<int32_t> lens;
  std::vector<Tensor> k, v;  // full caches [n_kv, cap, hd]
  Tensor q, k_cur, v_cur;
};

Case MakeCase(std::mt19937& rng, std::vector<int32_t> lens, int64_t n_heads, int64_t n_kv, int64_t hd) {
  Case c;
  c.n_heads = n_heads, c.n_kv = n_kv, c.hd = hd, c.lens = lens;
  const int64_t n = lens.size();
  for (int32_t len : lens) {
    c.k.push_back(RandomF32(rng, {n_kv, len + 3, hd}, -2, 2));
    c.v.push_back(RandomF32(rng, {n_kv, len + 3, hd}));
  }
  c.q = RandomF32(rng, {n, n_heads, hd}, -2, 2);
  c.k_cur = RandomF32(rng, {n, n_kv, hd}, -2, 2);
  c.v_cur = RandomF32(rng, {n, n_kv, hd});
  return c;
}

// The oracle: dense attention restricted to each head's set (double accumulation).
std::vector<float> Reference(const Case& c, const IndexSets& sets, float scale) {
  const int64_t n = c.lens.size(), group = c.n_heads / c.n_kv;
  std::vector<float> out(n * c.n_heads * c.hd);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t cap = c.k[i].dim(1);
    for (int64_t h = 0; h < c.n_heads; ++h) {
      const int64_t g = h / group;
      DenseAttentionOverRows(c.q.as<float>() + (i * c.n_heads + h) * c.hd, c.k[i].as<float>() + g * cap * c.hd,
                             c.v[i].as<float>() + g * cap * c.hd, c.hd, sets.Positions(i, g),
                             c.k_cur.as<float>() + (i * c.n_kv + g) * c.hd, c.v_cur.as<float>() + (i * c.n_kv + g) * c.hd,
                             scale, out.data() + (i * c.n_heads + h) * c.hd);
    }
  }
  return out;
}

TEST(SparseAttention, FullCacheEqualsDenseRestrictedToTheSet) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  for (int32_t sets_per_seq : {4, 1}) {
    Case c = MakeCase(rng, {1, 17, 97, 2049}, 12, 4, 17);
    IndexSets sets = RandomSets(rng, c.lens, 4, sets_per_seq, 61);
    std::vector<SparseKvView> kv;
    for (size_t i = 0; i < c.lens.size(); ++i) kv.push_back({c.k[i], c.v[i]});
    SparseAttentionArgs a;
    a.sets = &sets;
    a.kv = kv;
    a.q = c.q, a.k_cur = c.k_cur, a.v_cur = c.v_cur;
    Tensor out = Tensor::HostEmpty(DType::kF32, {4, 12, 17});
    ASSERT_TRUE(SparseAttentionCpu(a, &out).ok());
    ExpectClose(out, Reference(c, sets, 1.0f / std::sqrt(17.0f)), 1e-5f, 1e-4f);
  }
}

TEST(SparseAttention, SlotBufferPathIsBitIdenticalToFullCachePath) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int32_t budget = 33;
  Case c = MakeCase(rng, {20, 300, 41}, 8, 2, 32);
  IndexSets sets = RandomSets(rng, c.lens, 2, 2, budget);
  // Scatter each set's rows into a slot buffer at a random permutation of slots.
  std::vector<int32_t> slots(sets.indices.size());
  std::vector<Tensor> sk, sv;
  for (int32_t i = 0; i < 3; ++i) {
    sk.push_back(RandomF32(rng, {2, budget, 32}));  // stale garbage in unused slots
    sv.push_back(RandomF32(rng, {2, budget, 32}));
    for (int32_t g = 0; g < 2; ++g) {
      std::vector<int32_t> perm(budget);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      const int32_t set = sets.SetIndex(i, g), cap = c.k[i].dim(1);
      for (int32_t j = sets.indptr[set]; j < sets.indptr[set + 1]; ++j) {
        slots[j] = perm[j - sets.indptr[set]];
        std::memcpy(sk[i].as<float>() + (g * budget + slots[j]) * 32,
                    c.k[i].as<float>() + (g * cap + sets.indices[j]) * 32, 32 * 4);
        std::memcpy(sv[i].as<float>() + (g * budget + slots[j]) * 32,
                    c.v[i].as<float>() + (g * cap + sets.indices[j]) * 32, 32 * 4);
      }
    }
  }
  std::vector<SparseKvView> full, slotted;
  for (int i = 0; i < 3; ++i) {
    full.push_back({c.k[i], c.v[i]});
    slotted.push_back({sk[i], sv[i]});
  }
  SparseAttentionArgs a;
  a.sets = &sets;
  a.q = c.q, a.k_cur = c.k_cur, a.v_cur = c.v_cur;
  a.kv = full;
  Tensor o1 = Tensor::HostEmpty(DType::kF32, {3, 8, 32}), o2 = Tensor::HostEmpty(DType::kF32, {3, 8, 32});
  ASSERT_TRUE(SparseAttentionCpu(a, &o1).ok());
  a.kv = slotted;
  a.slots = slots;
  ASSERT_TRUE(SparseAttentionCpu(a, &o2).ok());
  EXPECT_EQ(std::memcmp(o1.data(), o2.data(), o1.nbytes()), 0);
  ExpectClose(o2, Reference(c, sets, 1.0f / std::sqrt(32.0f)), 1e-5f, 1e-4f);
}

TEST(SparseAttention, AllPositionsEqualsTheBackendsDenseAttention) {
  // B >= len: the sparse path must be the dense path (CPU backend's causal attention).
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int64_t n_heads = 6, n_kv = 2, hd = 16;
  std::vector<int32_t> lens = {5, 130};
  Case c = MakeCase(rng, lens, n_heads, n_kv, hd);
  IndexSets sets = RandomSets(rng, lens, n_kv, n_kv, 2048, 2048);  // every past position
  auto backend = MakeCpuBackend();
  std::vector<SequenceKv> seq_kv(2);
  BatchDesc batch;
  for (int i = 0; i < 2; ++i) {
    seq_kv[i].k = {c.k[i]};
    seq_kv[i].v = {c.v[i]};
    seq_kv[i].capacity = c.k[i].dim(1);
    batch.seqs.push_back({i, 1, lens[i]});
    batch.kv.push_back(&seq_kv[i]);
  }
  batch.n_tokens = 2;
  ASSERT_TRUE(backend->PrepareBatch(batch).ok());
  ASSERT_TRUE(backend->KvAppend(0, c.k_cur, c.v_cur).ok());
  Tensor dense = Tensor::HostEmpty(DType::kF32, {2, n_heads, hd});
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ASSERT_TRUE(backend->Attention(0, c.q, scale, &dense).ok());
  std::vector<SparseKvView> kv = {{c.k[0], c.v[0]}, {c.k[1], c.v[1]}};
  SparseAttentionArgs a;
  a.sets = &sets;
  a.kv = kv;
  a.q = c.q, a.k_cur = c.k_cur, a.v_cur = c.v_cur;
  Tensor sparse = Tensor::HostEmpty(DType::kF32, {2, n_heads, hd});
  ASSERT_TRUE(SparseAttentionCpu(a, &sparse).ok());
  ExpectClose(sparse, std::vector<float>(dense.as<float>(), dense.as<float>() + dense.numel()), 1e-5f, 1e-4f);
}

TEST(SparseAttention, OffloadedLayerThroughElasticLoadingEqualsResidentLayer) {
  // Selection -> elastic loading -> attention over slot buffers, step after step, must give the resident
  // layer's output bit for bit (same index sets, same order, same rows).
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const int64_t n_heads = 8, n_kv = 2, hd = 16, cap = 400;
  const int32_t budget = 24;
  std::vector<int32_t> lens = {3, 90};
  Case c = MakeCase(rng, {cap - 3, cap - 3}, n_heads, n_kv, hd);  // caches of `cap` rows
  std::vector<Tensor> sk, sv;
  std::vector<SlotMap> maps(2, SlotMap(n_kv, budget));
  std::vector<SlotMap*> mp = {&maps[0], &maps[1]};
  for (int i = 0; i < 2; ++i) {
    sk.push_back(RandomF32(rng, {n_kv, budget, hd}));
    sv.push_back(RandomF32(rng, {n_kv, budget, hd}));
  }
  std::vector<Tensor> retrieval_k = {RandomF32(rng, {n_kv, cap, hd}, -2, 2), RandomF32(rng, {n_kv, cap, hd}, -2, 2)};
  for (int step = 0; step < 40; ++step) {
    std::vector<SelectionQuery> sq(2);
    for (int i = 0; i < 2; ++i) {
      lens[i] += 1 + rng() % 5;
      sq[i] = {RandomF32(rng, {n_heads, hd}, -2, 2), retrieval_k[i], lens[i]};
    }
    SelectionOptions so;
    so.budget = budget;
    auto sel = SelectTopB(sq, so);
    ASSERT_TRUE(sel.ok()) << sel.status();
    auto plan = PlanElasticLoads(std::vector<const SlotMap*>{mp[0], mp[1]}, sel->sets);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::vector<LayerRows> rows = {{c.k[0], c.v[0], sk[0], sv[0]}, {c.k[1], c.v[1], sk[1], sv[1]}};
    ASSERT_TRUE(ExecuteCopiesCpu(plan->copies, rows, nullptr).ok());
    ASSERT_TRUE(ApplyElasticPlan(*plan, sel->sets, mp).ok());
    std::vector<SparseKvView> full = {{c.k[0], c.v[0]}, {c.k[1], c.v[1]}}, slotted = {{sk[0], sv[0]}, {sk[1], sv[1]}};
    SparseAttentionArgs a;
    a.sets = &sel->sets;
    a.q = RandomF32(rng, {2, n_heads, hd}, -2, 2);
    a.k_cur = RandomF32(rng, {2, n_kv, hd});
    a.v_cur = RandomF32(rng, {2, n_kv, hd});
    a.kv = full;
    Tensor o1 = Tensor::HostEmpty(DType::kF32, {2, n_heads, hd}), o2 = Tensor::HostEmpty(DType::kF32, {2, n_heads, hd});
    ASSERT_TRUE(SparseAttentionCpu(a, &o1).ok());
    a.kv = slotted;
    a.slots = plan->slots;
    ASSERT_TRUE(SparseAttentionCpu(a, &o2).ok());
    ASSERT_EQ(std::memcmp(o1.data(), o2.data(), o1.nbytes()), 0) << "step " << step;
  }
}

TEST(SparseAttention, ReadsBf16Caches) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  Case c = MakeCase(rng, {50}, 4, 1, 8);
  // Round the f32 caches to bf16 so the f32 reference sees the same values.
  Tensor kb = Tensor::HostEmpty(DType::kBF16, c.k[0].shape()), vb = Tensor::HostEmpty(DType::kBF16, c.v[0].shape());
  ConvertFromF32(c.k[0].as<float>(), DType::kBF16, kb.data(), kb.numel());
  ConvertFromF32(c.v[0].as<float>(), DType::kBF16, vb.data(), vb.numel());
  ConvertToF32(kb.data(), DType::kBF16, c.k[0].as<float>(), kb.numel());
  ConvertToF32(vb.data(), DType::kBF16, c.v[0].as<float>(), vb.numel());
  IndexSets sets = RandomSets(rng, c.lens, 1, 1, 20, 20);
  std::vector<SparseKvView> kv = {{kb, vb}};
  SparseAttentionArgs a;
  a.sets = &sets;
  a.kv = kv;
  a.q = c.q, a.k_cur = c.k_cur, a.v_cur = c.v_cur;
  Tensor out = Tensor::HostEmpty(DType::kF32, {1, 4, 8});
  ASSERT_TRUE(SparseAttentionCpu(a, &out).ok());
  ExpectClose(out, Reference(c, sets, 1.0f / std::sqrt(8.0f)), 1e-5f, 1e-4f);
}

TEST(SparseAttention, RejectsOutOfRangeSlotsAndBadShapes) {
  std::mt19937 rng(FreshSeed());
  Case c = MakeCase(rng, {30}, 4, 2, 8);
  IndexSets sets = RandomSets(rng, c.lens, 2, 2, 10, 10);
  std::vector<SparseKvView> kv = {{c.k[0], c.v[0]}};
  SparseAttentionArgs a;
  a.sets = &sets;
  a.kv = kv;
  a.q = c.q, a.k_cur = c.k_cur, a.v_cur = c.v_cur;
  Tensor out = Tensor::HostEmpty(DType::kF32, {1, 4, 8});
  ASSERT_TRUE(SparseAttentionCpu(a, &out).ok());
  std::vector<int32_t> slots(sets.indices.size(), 0);
  slots[3] = 10;
  Tensor sk = RandomF32(rng, {2, 10, 8}), sv = RandomF32(rng, {2, 10, 8});
  std::vector<SparseKvView> skv = {{sk, sv}};
  a.kv = skv;
  a.slots = slots;
  EXPECT_THAT(SparseAttentionCpu(a, &out).message(), ::testing::HasSubstr("slot 10 outside"));
  a.slots = {};
  sets.seq_len[0] = 100;  // positions may now exceed the cache's 33 rows
  sets.indices.back() = 90;
  a.kv = kv;
  EXPECT_THAT(SparseAttentionCpu(a, &out).message(), ::testing::HasSubstr("position 90 outside"));
  Tensor bad_out = Tensor::HostEmpty(DType::kF32, {1, 4, 9});
  EXPECT_FALSE(SparseAttentionCpu(a, &bad_out).ok());
  sets.indices.back() = 5;  // not ascending any more
  EXPECT_THAT(SparseAttentionCpu(a, &out).message(), ::testing::HasSubstr("ascending"));
}

}  // namespace
}  // namespace specontext
