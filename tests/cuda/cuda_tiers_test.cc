// KV tiers of the CUDA backend: pinned host allocations (accounting per kind, never against the device
// limit), CopyToPinnedHost, KvAppendHost (rows land in the host copy at past_len, nothing else changes;
// a following ElasticLoad sees them), and the errors of the sparse ops on bad input.
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

constexpr size_t kKv = static_cast<size_t>(MemoryKind::kKvCache);

TEST(CudaTiersTest, PinnedHostIsAccountedApart) {
  CudaBackendOptions o;
  o.memory_limit = int64_t{64} << 20;
  SPC_GPU_OR_SKIP(gpu, o);
  const MemoryReport dev0 = gpu->memory_report();
  const int64_t before = gpu->host_memory_report().bytes[kKv];
  {
    // 128 MiB pinned: twice the device limit, so it must not count against it.
    auto t = gpu->AllocPinnedHost(DType::kBF16, {64, 1024, 1024}, MemoryKind::kKvCache);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->device(), DeviceKind::kCuda);
    EXPECT_EQ(gpu->host_memory_report().bytes[kKv] - before, int64_t{128} << 20);
    EXPECT_EQ(gpu->memory_report().total, dev0.total);
    std::memset(t->data(), 0x3c, 4096);  // host-addressable
  }
  EXPECT_EQ(gpu->host_memory_report().bytes[kKv], before);
  EXPECT_GE(gpu->host_memory_report().peak, int64_t{128} << 20);
}

TEST(CudaTiersTest, CopyToPinnedHost) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  Tensor src = RandomHost({3, 77, 64}, rng);
  auto dev = *gpu->ToDevice(src, DType::kBF16, MemoryKind::kKvCache);
  auto host = gpu->AllocPinnedHost(DType::kBF16, {3, 77, 64}, MemoryKind::kKvCache);
  ASSERT_TRUE(host.ok());
  ASSERT_TRUE(gpu->CopyToPinnedHost(dev, &*host).ok());
  for (int64_t i = 0; i < src.numel(); ++i) {
    ASSERT_EQ(host->as<uint16_t>()[i], F32ToBf16(src.as<float>()[i])) << "element " << i;
  }
  auto wrong = *gpu->AllocPinnedHost(DType::kBF16, {3, 76, 64}, MemoryKind::kKvCache);
  EXPECT_EQ(gpu->CopyToPinnedHost(dev, &wrong).code(), absl::StatusCode::kInvalidArgument);
}

// Two layers, both offloaded; a batch of sequences appends one token each to layer `layer`.
TEST(CudaTiersTest, KvAppendHostThenElasticLoad) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  const int n_kv = 2, hd = 128, budget = 5, n_layers = 2;
  const std::vector<int> past = {4, 20, 0};
  std::vector<SequenceKv> kv(past.size());
  std::vector<std::vector<uint16_t>> want_k(past.size()), want_v(past.size());
  for (size_t i = 0; i < past.size(); ++i) {
    const int cap = past[i] + 3;
    kv[i].capacity = cap;
    kv[i].slot_budget = budget;
    for (int l = 0; l < n_layers; ++l) {
      auto hk = *gpu->AllocPinnedHost(DType::kBF16, {n_kv, cap, hd}, MemoryKind::kKvCache);
      auto hv = *gpu->AllocPinnedHost(DType::kBF16, {n_kv, cap, hd}, MemoryKind::kKvCache);
      for (int64_t e = 0; e < hk.numel(); ++e) {
        hk.as<uint16_t>()[e] = F32ToBf16(RandomHost({1}, rng).as<float>()[0]);
        hv.as<uint16_t>()[e] = static_cast<uint16_t>(rng());
      }
      kv[i].host_k.push_back(hk);
      kv[i].host_v.push_back(hv);
      kv[i].k.push_back(hk);
      kv[i].v.push_back(hv);
      kv[i].slot_k.push_back(*gpu->Alloc(DType::kBF16, {n_kv, budget, hd}, MemoryKind::kPrefetch));
      kv[i].slot_v.push_back(*gpu->Alloc(DType::kBF16, {n_kv, budget, hd}, MemoryKind::kPrefetch));
    }
    want_k[i].assign(kv[i].host_k[0].as<uint16_t>(), kv[i].host_k[0].as<uint16_t>() + n_kv * cap * hd);
    want_v[i].assign(kv[i].host_v[0].as<uint16_t>(), kv[i].host_v[0].as<uint16_t>() + n_kv * cap * hd);
  }
  BatchDesc b;
  for (size_t i = 0; i < past.size(); ++i) {
    b.seqs.push_back({static_cast<int>(i), 1, past[i]});
    b.kv.push_back(&kv[i]);
  }
  b.n_tokens = static_cast<int>(past.size());
  ASSERT_TRUE(gpu->PrepareBatch(b).ok());
  const int n = b.n_tokens;
  Tensor k = RandomHost({n, n_kv, hd}, rng), v = RandomHost({n, n_kv, hd}, rng);
  auto gk = *gpu->ToDevice(k, DType::kBF16, MemoryKind::kWorkspace), gv = *gpu->ToDevice(v, DType::kBF16, MemoryKind::kWorkspace);
  // The rows must be visible to the following load of layer 0 (copy stream).
  absl::Status st = gpu->KvAppendHost(0, gk, gv);
  ASSERT_TRUE(st.ok()) << st;
  for (size_t i = 0; i < past.size(); ++i) {
    for (int h = 0; h < n_kv; ++h) {
      for (int d = 0; d < hd; ++d) {
        const size_t dst = (size_t(h) * kv[i].capacity + past[i]) * hd + d, src = (i * n_kv + h) * hd + d;
        want_k[i][dst] = F32ToBf16(k.as<float>()[src]);
        want_v[i][dst] = F32ToBf16(v.as<float>()[src]);
      }
    }
  }
  // Load slot 0 of every set with the new token's row, then read the slot buffers back.
  IndexSets sets;
  sets.Reset(n, n_kv, n_kv, budget);
  for (int i = 0; i < n; ++i) {
    sets.seq_len[i] = past[i];
    for (int h = 0; h < n_kv; ++h) sets.indptr.push_back(0);
  }
  CopyList cl;
  cl.Reset(n, n_kv, n_kv, budget);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < n_kv; ++h) {
      cl.copies.push_back({past[i], 2});
      cl.copy_ptr.push_back(static_cast<int32_t>(cl.copies.size()));
    }
  }
  st = gpu->ElasticLoad(0, cl, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  // Slot buffers are consumed by SparseAttention (which waits for the load); to read them back
  // directly, wait for the copy stream.
  ASSERT_TRUE(dynamic_cast<cuda::CudaBackend&>(*gpu).SyncCopyStream().ok());
  ASSERT_TRUE(gpu->Synchronize().ok());
  for (size_t i = 0; i < past.size(); ++i) {
    Tensor sk = Tensor::HostEmpty(DType::kBF16, kv[i].slot_k[0].shape());
    ASSERT_TRUE(gpu->ToHost(kv[i].slot_k[0], &sk).ok());
    for (int h = 0; h < n_kv; ++h) {
      EXPECT_EQ(std::memcmp(sk.as<uint16_t>() + (size_t(h) * budget + 2) * hd,
                            want_k[i].data() + (size_t(h) * kv[i].capacity + past[i]) * hd, hd * 2), 0)
          << "seq " << i << " head " << h << ": the load did not see the appended row";
    }
  }
  // After Synchronize the host rows of another layer are complete too.
  st = gpu->KvAppendHost(n_layers - 1, gk, gv);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(gpu->Synchronize().ok());
  for (size_t i = 0; i < past.size(); ++i) {
    EXPECT_EQ(std::memcmp(kv[i].host_k[0].data(), want_k[i].data(), want_k[i].size() * 2), 0) << "seq " << i << " K";
    EXPECT_EQ(std::memcmp(kv[i].host_v[0].data(), want_v[i].data(), want_v[i].size() * 2), 0) << "seq " << i << " V";
    EXPECT_EQ(std::memcmp(kv[i].host_k[1].data(), want_k[i].data(), want_k[i].size() * 2) == 0, false)
        << "layer 1 started from other random values";
    for (int h = 0; h < n_kv; ++h) {
      EXPECT_EQ(std::memcmp(kv[i].host_k[1].as<uint16_t>() + (size_t(h) * kv[i].capacity + past[i]) * hd,
                            want_k[i].data() + (size_t(h) * kv[i].capacity + past[i]) * hd, hd * 2), 0)
          << "seq " << i << " layer 1 head " << h;
    }
  }
  // Bad input: a slot past the budget, a token past the capacity, a resident layer.
  CopyList bad = cl;
  bad.copies[1].slot = budget;
  EXPECT_EQ(gpu->ElasticLoad(0, bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
  bad = cl;
  bad.copies[0].token = kv[0].capacity;
  EXPECT_EQ(gpu->ElasticLoad(1, bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
  bad = cl;
  bad.copy_ptr.pop_back();
  EXPECT_EQ(gpu->ElasticLoad(0, bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CudaTiersTest, SparseOpsRejectBadInput) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  const int n_kv = 2, hd = 64, cap = 10;
  SequenceKv kv;
  kv.capacity = cap;
  kv.k = {*gpu->ToDevice(RandomHost({n_kv, cap, hd}, rng), DType::kBF16, MemoryKind::kKvCache)};
  kv.v = {*gpu->ToDevice(RandomHost({n_kv, cap, hd}, rng), DType::kBF16, MemoryKind::kKvCache)};
  BatchDesc b;
  b.seqs = {{0, 1, 6}};
  b.kv = {&kv};
  b.n_tokens = 1;
  ASSERT_TRUE(gpu->PrepareBatch(b).ok());
  auto q = *gpu->ToDevice(RandomHost({1, 4, hd}, rng), DType::kBF16, MemoryKind::kWorkspace);
  auto kc = *gpu->ToDevice(RandomHost({1, n_kv, hd}, rng), DType::kBF16, MemoryKind::kWorkspace);
  auto out = *gpu->Alloc(DType::kBF16, {1, 4, hd}, MemoryKind::kWorkspace);
  EXPECT_EQ(gpu->SparseAttention(0, q, kc, kc, 0.1f, &out).code(), absl::StatusCode::kFailedPrecondition);
  IndexSets sets;
  sets.Reset(1, n_kv, n_kv, 4);
  sets.seq_len[0] = 6;
  sets.indices = {0, 5, 1, 2, 3};
  sets.indptr = {0, 2, 5};
  EXPECT_TRUE(gpu->PrepareSparseDecode({&sets, {}}).ok());
  EXPECT_TRUE(gpu->SparseAttention(0, q, kc, kc, 0.1f, &out).ok());
  EXPECT_EQ(gpu->SparseAttention(0, q, q, kc, 0.1f, &out).code(), absl::StatusCode::kInvalidArgument);
  sets.seq_len[0] = 7;  // differs from past_len
  EXPECT_EQ(gpu->PrepareSparseDecode({&sets, {}}).code(), absl::StatusCode::kInvalidArgument);
  sets.seq_len[0] = 6;
  sets.indices = {0, 6, 1, 2, 3};  // position past the sequence
  EXPECT_EQ(gpu->PrepareSparseDecode({&sets, {}}).code(), absl::StatusCode::kInvalidArgument);
  CopyList cl;
  cl.n_seqs = 1;
  cl.n_kv_heads = n_kv;
  cl.sets_per_seq = 1;
  cl.copy_ptr = {0, 0};
  EXPECT_EQ(gpu->ElasticLoad(0, cl, nullptr).code(), absl::StatusCode::kFailedPrecondition);  // resident layer
  ASSERT_TRUE(gpu->Synchronize().ok());
}

}  // namespace
}  // namespace specontext::testing
