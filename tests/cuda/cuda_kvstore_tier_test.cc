// The host KV tier in a kvstore segment on the GPU (generator --kvstore with offloaded layers): the
// segment's block data is registered with the CUDA backend (RegisterHostMemory: cudaHostRegister, mapped),
// host_k/host_v of offloaded layers are WrapHostTensor views of runs of blocks, and the GPU's KvAppendHost
// (writes the mapped rows) and ElasticLoad (gather kernel reading them over PCIe) give exactly what the
// CPU backend gives on f32 copies of the same rows — at several shapes, with sentinel-filled slot buffers.
// Also the registration's contract: alignment, overlap, views outside the region, unregister.
// Skipped without a GPU.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/sparse/elastic.h"
#include "kvstore/kv_store.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Segment {
  std::string name;
  std::unique_ptr<kvstore::KvStore> store;
  ~Segment() {
    store.reset();
    ::shm_unlink(("/" + name).c_str());
  }
};

std::unique_ptr<Segment> OpenSegment(uint64_t blocks, uint64_t block_bytes) {
  static std::atomic<int> counter{0};
  auto s = std::make_unique<Segment>();
  s->name = absl::StrCat("spc_cuda_tier_", ::getpid(), "_", counter++);
  ::shm_unlink(("/" + s->name).c_str());
  kvstore::KvStoreOptions o;
  o.name = s->name;
  o.mode = kvstore::OpenMode::kCreate;
  kvstore::Geometry g;
  g.block_count = blocks;
  g.block_bytes = block_bytes;
  o.geometry = g;
  auto st = kvstore::KvStore::Open(o);
  EXPECT_TRUE(st.ok()) << st.status();
  if (!st.ok()) return nullptr;
  s->store = *std::move(st);
  return s;
}

// A tensor over a fresh run of blocks of sequence `seq` (freed with the segment).
Tensor RunTensor(Backend& gpu, kvstore::KvStore& store, uint64_t seq, const Shape& shape) {
  const uint64_t bytes = static_cast<uint64_t>(NumElements(shape)) * 2;
  const uint32_t n = static_cast<uint32_t>((bytes + store.block_bytes() - 1) / store.block_bytes());
  auto first = store.AllocateRun(seq, n);
  EXPECT_TRUE(first.ok()) << first.status();
  if (!first.ok()) return Tensor();
  auto t = gpu.WrapHostTensor(store.data_base() + uint64_t{*first} * store.block_bytes(), DType::kBF16, shape, nullptr);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : Tensor();
}

struct Shape4 {
  int n_kv, hd, cap, budget;
};

class CudaKvstoreTierTest : public ::testing::TestWithParam<Shape4> {};

// Two sequences, two offloaded layers each, in the segment. GPU: append one token per sequence into the
// mapped rows of layer 1, then elastic-load random rows (the new one included) of both layers. CPU: the
// same on f32 copies. Slot buffers (sentinels outside the copied slots) must match exactly.
TEST_P(CudaKvstoreTierTest, AppendAndElasticLoadMatchCpu) {
  SPC_GPU_OR_SKIP(gpu);
  const Shape4 p = GetParam();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  SCOPED_TRACE(absl::StrCat("seed ", seed, " n_kv ", p.n_kv, " hd ", p.hd, " cap ", p.cap, " budget ", p.budget));
  const int n_layers = 2, n_seqs = 2;
  const uint64_t tensor_bytes = uint64_t(p.n_kv) * p.cap * p.hd * 2, block_bytes = 64 * 1024;
  const uint64_t blocks = 2 * n_layers * n_seqs * ((tensor_bytes + block_bytes - 1) / block_bytes) + 3;
  auto seg = OpenSegment(blocks, block_bytes);
  ASSERT_NE(seg, nullptr);
  kvstore::KvStore& store = *seg->store;
  ASSERT_TRUE(gpu->RegisterHostMemory(store.data_base(), store.data_bytes()).ok());
  auto cpu = MakeCpuBackend();
  const Shape full{p.n_kv, p.cap, p.hd}, slots{p.n_kv, p.budget, p.hd};
  std::vector<SequenceKv> g(n_seqs), c(n_seqs);
  const std::vector<int> past = {p.cap / 2, p.cap - 1};
  for (int i = 0; i < n_seqs; ++i) {
    for (SequenceKv* kv : {&g[i], &c[i]}) {
      kv->capacity = p.cap;
      kv->slot_budget = p.budget;
    }
    for (int l = 0; l < n_layers; ++l) {
      Tensor hk = RunTensor(*gpu, store, 10 + i, full), hv = RunTensor(*gpu, store, 10 + i, full);
      ASSERT_FALSE(hk.empty() || hv.empty());
      ASSERT_EQ(hk.device(), DeviceKind::kCuda);
      Tensor ck = Tensor::HostEmpty(DType::kF32, full), cv = Tensor::HostEmpty(DType::kF32, full);
      for (int64_t e = 0; e < hk.numel(); ++e) {
        const uint16_t kb = F32ToBf16(std::uniform_real_distribution<float>(-2, 2)(rng));
        const uint16_t vb = F32ToBf16(std::uniform_real_distribution<float>(-2, 2)(rng));
        hk.as<uint16_t>()[e] = kb;  // host writes through the mapping
        hv.as<uint16_t>()[e] = vb;
        ck.as<float>()[e] = Bf16ToF32(kb);
        cv.as<float>()[e] = Bf16ToF32(vb);
      }
      g[i].host_k.push_back(hk);
      g[i].host_v.push_back(hv);
      g[i].k.push_back(hk);
      g[i].v.push_back(hv);
      c[i].host_k.push_back(ck);
      c[i].host_v.push_back(cv);
      c[i].k.push_back(ck);
      c[i].v.push_back(cv);
      // Sentinels: every slot the loads do not write must keep them.
      Tensor sent = Tensor::HostEmpty(DType::kF32, slots);
      for (int64_t e = 0; e < sent.numel(); ++e) sent.as<float>()[e] = Bf16ToF32(F32ToBf16(1000.0f + e % 97));
      for (int kv_part = 0; kv_part < 2; ++kv_part) {
        auto gs = gpu->ToDevice(sent, DType::kBF16, MemoryKind::kPrefetch);
        ASSERT_TRUE(gs.ok());
        Tensor cs = Tensor::HostEmpty(DType::kF32, slots);
        std::memcpy(cs.data(), sent.data(), sent.nbytes());
        (kv_part == 0 ? g[i].slot_k : g[i].slot_v).push_back(*gs);
        (kv_part == 0 ? c[i].slot_k : c[i].slot_v).push_back(cs);
      }
    }
  }
  BatchDesc gb, cb;
  for (int i = 0; i < n_seqs; ++i) {
    gb.seqs.push_back({i, 1, past[i]});
    gb.kv.push_back(&g[i]);
    cb.seqs.push_back({i, 1, past[i]});
    cb.kv.push_back(&c[i]);
  }
  gb.n_tokens = cb.n_tokens = n_seqs;
  ASSERT_TRUE(gpu->PrepareBatch(gb).ok());
  ASSERT_TRUE(cpu->PrepareBatch(cb).ok());
  Tensor nk = RandomHost({n_seqs, p.n_kv, p.hd}, rng), nv = RandomHost({n_seqs, p.n_kv, p.hd}, rng);
  auto gk = gpu->ToDevice(nk, DType::kBF16, MemoryKind::kWorkspace);
  auto gv = gpu->ToDevice(nv, DType::kBF16, MemoryKind::kWorkspace);
  ASSERT_TRUE(gk.ok() && gv.ok());
  absl::Status st = gpu->KvAppendHost(1, *gk, *gv);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(cpu->KvAppendHost(1, nk, nv).ok());
  // Random distinct rows (and the appended one) into random distinct slots, per (sequence, KV head).
  CopyList cl;
  cl.Reset(n_seqs, p.n_kv, p.n_kv, p.budget);
  for (int i = 0; i < n_seqs; ++i) {
    for (int h = 0; h < p.n_kv; ++h) {
      std::vector<int32_t> tokens(past[i] + 1), slot_ids(p.budget);
      std::iota(tokens.begin(), tokens.end(), 0);
      std::iota(slot_ids.begin(), slot_ids.end(), 0);
      std::shuffle(tokens.begin(), tokens.end() - 1, rng);
      std::shuffle(slot_ids.begin(), slot_ids.end(), rng);
      const int n = std::min<int>(static_cast<int>(tokens.size()), 1 + static_cast<int>(rng() % p.budget));
      cl.copies.push_back({past[i], slot_ids[0]});
      for (int j = 1; j < n; ++j) cl.copies.push_back({tokens[j - 1], slot_ids[j]});
      cl.copy_ptr.push_back(static_cast<int32_t>(cl.copies.size()));
    }
  }
  for (int l = 0; l < n_layers; ++l) {
    st = gpu->ElasticLoad(l, cl, nullptr);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(cpu->ElasticLoad(l, cl, nullptr).ok());
  }
  ASSERT_TRUE(dynamic_cast<cuda::CudaBackend&>(*gpu).SyncCopyStream().ok());
  ASSERT_TRUE(gpu->Synchronize().ok());
  for (int i = 0; i < n_seqs; ++i) {
    for (int l = 0; l < n_layers; ++l) {
      for (int kv_part = 0; kv_part < 2; ++kv_part) {
        const Tensor& gs = kv_part == 0 ? g[i].slot_k[l] : g[i].slot_v[l];
        const Tensor& cs = kv_part == 0 ? c[i].slot_k[l] : c[i].slot_v[l];
        Tensor got = DeviceToF32(*gpu, gs);
        int bad = 0;
        for (int64_t e = 0; e < got.numel() && bad < 5; ++e) {
          // Copies are exact: the CPU rows are the bf16 values (the appended row rounded by F32ToBf16).
          const float want = Bf16ToF32(F32ToBf16(cs.as<float>()[e]));
          if (got.as<float>()[e] != want) {
            ADD_FAILURE() << "seq " << i << " layer " << l << (kv_part == 0 ? " K" : " V") << " element " << e
                          << ": " << got.as<float>()[e] << " vs " << want;
            ++bad;
          }
        }
      }
      // The append landed in the segment's rows (host view) exactly where the CPU put it.
      for (int h = 0; h < p.n_kv; ++h) {
        for (int d = 0; d < p.hd; ++d) {
          const size_t at = (size_t(h) * p.cap + past[i]) * p.hd + d;
          ASSERT_EQ(g[i].host_k[1].as<uint16_t>()[at], F32ToBf16(c[i].host_k[1].as<float>()[at]));
          ASSERT_EQ(g[i].host_v[1].as<uint16_t>()[at], F32ToBf16(c[i].host_v[1].as<float>()[at]));
        }
      }
    }
  }
  g.clear();
  EXPECT_TRUE(gpu->UnregisterHostMemory(store.data_base()).ok());
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaKvstoreTierTest,
                         ::testing::Values(Shape4{2, 128, 97, 17}, Shape4{8, 64, 300, 64}, Shape4{1, 128, 2049, 256},
                                           Shape4{4, 128, 33, 33}));

TEST(CudaKvstoreRegisterTest, Contract) {
  SPC_GPU_OR_SKIP(gpu);
  auto seg = OpenSegment(16, 8192);
  ASSERT_NE(seg, nullptr);
  kvstore::KvStore& store = *seg->store;
  uint8_t* base = store.data_base();
  EXPECT_EQ(gpu->RegisterHostMemory(base + 64, 4096).code(), absl::StatusCode::kInvalidArgument);  // not a page
  EXPECT_EQ(gpu->WrapHostTensor(base, DType::kBF16, {4, 4}, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);  // not registered yet
  ASSERT_TRUE(gpu->RegisterHostMemory(base, store.data_bytes()).ok());
  EXPECT_EQ(gpu->RegisterHostMemory(base, 4096).code(), absl::StatusCode::kAlreadyExists);
  auto t = gpu->WrapHostTensor(base + 8192, DType::kBF16, {2, 8, 64}, nullptr);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data(), base + 8192);
  EXPECT_EQ(t->device(), DeviceKind::kCuda);
  // Past the end of the region.
  EXPECT_EQ(gpu->WrapHostTensor(base + store.data_bytes() - 64, DType::kBF16, {64}, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Not accounted as backend pinned memory (the kvstore owns it).
  EXPECT_EQ(gpu->host_memory_report().bytes[static_cast<size_t>(MemoryKind::kKvCache)], 0);
  EXPECT_EQ(gpu->UnregisterHostMemory(base + 4096).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(gpu->UnregisterHostMemory(base).ok());
  EXPECT_EQ(gpu->WrapHostTensor(base, DType::kBF16, {4, 4}, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Registered again after unregistering (a generator that reattaches).
  EXPECT_TRUE(gpu->RegisterHostMemory(base, store.data_bytes()).ok());
  EXPECT_TRUE(gpu->UnregisterHostMemory(base).ok());
}

}  // namespace
}  // namespace specontext::testing
