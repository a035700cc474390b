// The CPU backend's sparse decode ops against core/sparse's references: sparse attention over random index
// sets equals dense attention restricted to the same rows; an offloaded layer (elastic load into slot
// buffers) gives bit-identical results to the resident layer; host append and misuse errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "core/backend.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/sparse_attention.h"

namespace specontext {
namespace {

constexpr int64_t kKv = 2, kHeads = 6, kHd = 8, kCap = 40;

Tensor Random(Shape shape, std::mt19937& rng) {
  Tensor t = Tensor::HostEmpty(DType::kF32, std::move(shape));
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = d(rng);
  return t;
}

// Random head-level sets of at most `budget` positions per KV head out of each sequence's past.
IndexSets RandomSets(const std::vector<int32_t>& past, int32_t budget, std::mt19937& rng) {
  IndexSets s;
  s.Reset(static_cast<int32_t>(past.size()), kKv, kKv, budget);
  for (size_t i = 0; i < past.size(); ++i) {
    const int32_t len = past[i];
    s.seq_len[i] = len;
    for (int g = 0; g < kKv; ++g) {
      std::vector<int32_t> all(len);
      for (int32_t i = 0; i < len; ++i) all[i] = i;
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(std::min(len, budget));
      std::sort(all.begin(), all.end());
      s.indices.insert(s.indices.end(), all.begin(), all.end());
      s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
    }
  }
  return s;
}

struct Batch {
  std::vector<std::unique_ptr<SequenceKv>> kv;
  BatchDesc desc;
};

Batch MakeBatch(const std::vector<int32_t>& past, std::mt19937& rng) {
  Batch b;
  for (size_t i = 0; i < past.size(); ++i) {
    auto kv = std::make_unique<SequenceKv>();
    kv->capacity = kCap;
    kv->k.push_back(Random({kKv, kCap, kHd}, rng));
    kv->v.push_back(Random({kKv, kCap, kHd}, rng));
    b.desc.seqs.push_back({static_cast<int32_t>(i), 1, past[i]});
    b.desc.kv.push_back(kv.get());
    b.kv.push_back(std::move(kv));
  }
  b.desc.n_tokens = static_cast<int32_t>(past.size());
  return b;
}

TEST(SparseOps, ResidentSparseAttentionEqualsDenseOverTheSameRows) {
  std::mt19937 rng(11);
  auto backend = MakeCpuBackend();
  const std::vector<int32_t> past = {1, 17, 33};
  for (int32_t budget : {1, 5, 16, 64}) {
    Batch b = MakeBatch(past, rng);
    IndexSets sets = RandomSets(past, budget, rng);
    const int64_t n = static_cast<int64_t>(past.size());
    Tensor q = Random({n, kHeads, kHd}, rng), kc = Random({n, kKv, kHd}, rng), vc = Random({n, kKv, kHd}, rng);
    Tensor out = Tensor::HostEmpty(DType::kF32, {n, kHeads, kHd});
    ASSERT_TRUE(backend->PrepareBatch(b.desc).ok());
    { auto pst = backend->PrepareSparseDecode({&sets, {}}); ASSERT_TRUE(pst.ok()) << pst; }
    const float scale = 0.3f;
    ASSERT_TRUE(backend->SparseAttention(0, q, kc, vc, scale, &out).ok());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < kHeads; ++h) {
        const int64_t g = h / (kHeads / kKv);
        auto rows = sets.Positions(static_cast<int32_t>(i), static_cast<int32_t>(g));
        std::vector<float> ref(kHd);
        const float* kh = b.kv[i]->k[0].as<float>() + g * kCap * kHd;
        const float* vh = b.kv[i]->v[0].as<float>() + g * kCap * kHd;
        DenseAttentionOverRows(q.as<float>() + (i * kHeads + h) * kHd, kh, vh, kHd, rows,
                               kc.as<float>() + (i * kKv + g) * kHd, vc.as<float>() + (i * kKv + g) * kHd, scale,
                               ref.data());
        for (int64_t e = 0; e < kHd; ++e) {
          EXPECT_NEAR(out.as<float>()[(i * kHeads + h) * kHd + e], ref[e], 1e-5)
              << "budget " << budget << " seq " << i << " head " << h;
        }
      }
    }
  }
}

TEST(SparseOps, OffloadedLayerReadsSlotBuffersAndMatchesResidentBitwise) {
  std::mt19937 rng(12);
  auto backend = MakeCpuBackend();
  const std::vector<int32_t> past = {9, 30};
  const int32_t budget = 6;
  Batch resident = MakeBatch(past, rng);
  // The same KV, offloaded: host copy (aliased by k/v) + slot buffers.
  Batch off;
  off.desc = resident.desc;
  std::vector<SlotMap> maps;
  for (size_t i = 0; i < past.size(); ++i) {
    auto kv = std::make_unique<SequenceKv>();
    kv->capacity = kCap;
    kv->slot_budget = budget;
    kv->host_k = {backend->AllocPinnedHost(DType::kF32, {kKv, kCap, kHd}, MemoryKind::kKvCache).value()};
    kv->host_v = {backend->AllocPinnedHost(DType::kF32, {kKv, kCap, kHd}, MemoryKind::kKvCache).value()};
    ASSERT_TRUE(backend->CopyToPinnedHost(resident.kv[i]->k[0], &kv->host_k[0]).ok());
    ASSERT_TRUE(backend->CopyToPinnedHost(resident.kv[i]->v[0], &kv->host_v[0]).ok());
    kv->k = kv->host_k;
    kv->v = kv->host_v;
    kv->slot_k = {backend->Alloc(DType::kF32, {kKv, budget, kHd}, MemoryKind::kPrefetch).value()};
    kv->slot_v = {backend->Alloc(DType::kF32, {kKv, budget, kHd}, MemoryKind::kPrefetch).value()};
    off.desc.kv[i] = kv.get();
    off.kv.push_back(std::move(kv));
    maps.emplace_back(kKv, budget);
  }
  EXPECT_GT(backend->host_memory_report().total, 0);
  EXPECT_EQ(backend->host_memory_report().bytes[static_cast<size_t>(MemoryKind::kKvCache)],
            backend->host_memory_report().total);
  const int64_t n = static_cast<int64_t>(past.size());
  ElasticCounters counters;
  for (int step = 0; step < 4; ++step) {  // successive steps exercise kept slots and freed slots
    IndexSets sets = RandomSets(past, budget, rng);
    Tensor q = Random({n, kHeads, kHd}, rng), kc = Random({n, kKv, kHd}, rng), vc = Random({n, kKv, kHd}, rng);
    Tensor a = Tensor::HostEmpty(DType::kF32, {n, kHeads, kHd}), b = Tensor::HostEmpty(DType::kF32, {n, kHeads, kHd});
    ASSERT_TRUE(backend->PrepareBatch(resident.desc).ok());
    { auto pst = backend->PrepareSparseDecode({&sets, {}}); ASSERT_TRUE(pst.ok()) << pst; }
    ASSERT_TRUE(backend->SparseAttention(0, q, kc, vc, 0.35f, &a).ok());

    std::vector<const SlotMap*> cm = {&maps[0], &maps[1]};
    std::vector<SlotMap*> m = {&maps[0], &maps[1]};
    auto plan = PlanElasticLoads(cm, sets);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(backend->PrepareBatch(off.desc).ok());
    ASSERT_TRUE(backend->PrepareSparseDecode({&sets, plan->slots}).ok());
    ASSERT_TRUE(backend->ElasticLoad(0, plan->copies, &counters).ok());
    ASSERT_TRUE(backend->SparseAttention(0, q, kc, vc, 0.35f, &b).ok());
    ASSERT_TRUE(ApplyElasticPlan(*plan, sets, m).ok());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << "step " << step;
  }
  EXPECT_GT(counters.rows_loaded, 0);
  EXPECT_LE(counters.bytes_loaded, counters.bytes_full_reload);
}

TEST(SparseOps, HostAppendWritesTheHostCopyAndMisuseIsRefused) {
  std::mt19937 rng(13);
  auto backend = MakeCpuBackend();
  SequenceKv kv;
  kv.capacity = kCap;
  kv.host_k = {backend->AllocPinnedHost(DType::kF32, {kKv, kCap, kHd}, MemoryKind::kKvCache).value()};
  kv.host_v = {backend->AllocPinnedHost(DType::kF32, {kKv, kCap, kHd}, MemoryKind::kKvCache).value()};
  kv.k = kv.host_k;
  kv.v = kv.host_v;
  kv.slot_k = {backend->Alloc(DType::kF32, {kKv, 4, kHd}, MemoryKind::kPrefetch).value()};
  kv.slot_v = {backend->Alloc(DType::kF32, {kKv, 4, kHd}, MemoryKind::kPrefetch).value()};
  BatchDesc d;
  d.seqs = {{0, 1, 5}};
  d.kv = {&kv};
  d.n_tokens = 1;
  Tensor k = Random({1, kKv, kHd}, rng), v = Random({1, kKv, kHd}, rng);
  ASSERT_TRUE(backend->PrepareBatch(d).ok());
  ASSERT_TRUE(backend->KvAppendHost(0, k, v).ok());
  for (int64_t g = 0; g < kKv; ++g) {
    EXPECT_EQ(std::memcmp(kv.host_k[0].as<float>() + (g * kCap + 5) * kHd, k.as<float>() + g * kHd, kHd * 4), 0);
    EXPECT_EQ(std::memcmp(kv.host_v[0].as<float>() + (g * kCap + 5) * kHd, v.as<float>() + g * kHd, kHd * 4), 0);
  }
  // Sparse attention before PrepareSparseDecode, sets of another past, slots missing for an offloaded layer.
  Tensor q = Random({1, kHeads, kHd}, rng), out = Tensor::HostEmpty(DType::kF32, {1, kHeads, kHd});
  EXPECT_EQ(backend->SparseAttention(0, q, k, v, 0.3f, &out).code(), absl::StatusCode::kFailedPrecondition);
  IndexSets sets = RandomSets({4}, 3, rng);
  EXPECT_EQ(backend->PrepareSparseDecode({&sets, {}}).code(), absl::StatusCode::kInvalidArgument);
  sets = RandomSets({5}, 3, rng);
  { auto pst = backend->PrepareSparseDecode({&sets, {}}); ASSERT_TRUE(pst.ok()) << pst; }
  EXPECT_EQ(backend->SparseAttention(0, q, k, v, 0.3f, &out).code(), absl::StatusCode::kFailedPrecondition);
  // A resident layer cannot be host-appended.
  SequenceKv dense;
  dense.capacity = kCap;
  dense.k = {Random({kKv, kCap, kHd}, rng)};
  dense.v = {Random({kKv, kCap, kHd}, rng)};
  d.kv = {&dense};
  ASSERT_TRUE(backend->PrepareBatch(d).ok());
  EXPECT_EQ(backend->KvAppendHost(0, k, v).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace specontext
