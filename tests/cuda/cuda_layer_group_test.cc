// Host layer groups on the GPU (SequenceKv "Host layout"): kv_tiers gives the offloaded layers of a group
// views of one pinned allocation; KvAppendHost writes a new token's rows into each layer's place and
// ElasticLoadLayers gathers a group's layers in one kernel. Against the CPU backend on plain f32 copies of the
// same rows, at several shapes and group sizes: the slot buffers (sentinels where no copy lands) and the
// appended host rows must match exactly, and the counters agree. Skipped without a GPU.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/elastic.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct GroupCase {
  int n_layers, gpu_layers, group, n_kv, hd, cap, budget;
};

class CudaLayerGroupTest : public ::testing::TestWithParam<GroupCase> {};

// A random list: per (sequence, KV head) distinct tokens below `len` (the last one first) into distinct slots.
CopyList RandomList(int n_seqs, int n_kv, int budget, const std::vector<int>& len, std::mt19937& rng) {
  CopyList cl;
  cl.Reset(n_seqs, n_kv, n_kv, budget);
  for (int i = 0; i < n_seqs; ++i) {
    for (int h = 0; h < n_kv; ++h) {
      std::vector<int32_t> tokens(len[i]), slots(budget);
      std::iota(tokens.begin(), tokens.end(), 0);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(tokens.begin(), tokens.end() - 1, rng);
      std::shuffle(slots.begin(), slots.end(), rng);
      const int n = std::min<int>(len[i], 1 + static_cast<int>(rng() % budget));
      cl.copies.push_back({len[i] - 1, slots[0]});
      for (int j = 1; j < n; ++j) cl.copies.push_back({tokens[j - 1], slots[j]});
      cl.copy_ptr.push_back(static_cast<int32_t>(cl.copies.size()));
    }
  }
  return cl;
}

TEST_P(CudaLayerGroupTest, AppendAndGroupedLoadsMatchCpu) {
  SPC_GPU_OR_SKIP(gpu);
  const GroupCase p = GetParam();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  SCOPED_TRACE(absl::StrCat("seed ", seed, " layers ", p.n_layers, " gpu ", p.gpu_layers, " group ", p.group, " n_kv ",
                            p.n_kv, " hd ", p.hd, " cap ", p.cap, " budget ", p.budget));
  gpu->set_host_kv_layer_group(p.group);
  ASSERT_TRUE(gpu->host_kv_interleaved());
  auto cpu = MakeCpuBackend();
  ModelConfig c;
  c.num_hidden_layers = p.n_layers;
  c.num_key_value_heads = p.n_kv;
  c.head_dim = p.hd;
  const int n_seqs = 2;
  const std::vector<int> past = {p.cap / 2, p.cap - 1};
  const Shape full{p.n_kv, p.cap, p.hd}, slots{p.n_kv, p.budget, p.hd};
  std::vector<std::unique_ptr<SequenceKv>> g(n_seqs);
  std::vector<SequenceKv> h(n_seqs);
  for (int i = 0; i < n_seqs; ++i) {
    auto kv = AllocateTieredKv(*gpu, c, p.cap, p.gpu_layers, p.budget);
    ASSERT_TRUE(kv.ok()) << kv.status();
    g[i] = *std::move(kv);
    SequenceKv& cs = h[i];
    cs.capacity = p.cap;
    cs.slot_budget = p.budget;
    cs.k.resize(p.n_layers);
    cs.v.resize(p.n_layers);
    cs.host_k.resize(p.n_layers);
    cs.host_v.resize(p.n_layers);
    cs.slot_k.resize(p.n_layers);
    cs.slot_v.resize(p.n_layers);
    for (int l = p.gpu_layers; l < p.n_layers; ++l) {
      ASSERT_TRUE(g[i]->offloaded(l));
      const HostLayerGroup grp = HostLayerGroupOf(p.n_layers, p.group, l);
      ASSERT_TRUE(IsKvPair(g[i]->host_k[l]));
      EXPECT_EQ(g[i]->host_k[l].ndim(), grp.layers > 1 ? 5 : 4);
      // The same random bf16 rows on both sides, written through the mapping on the GPU side.
      const KvRowsView r = KvRowsOf(g[i]->host_k[l], g[i]->host_v[l]);
      EXPECT_EQ(r.stride, 2 * grp.layers * p.hd);
      Tensor ck = Tensor::HostEmpty(DType::kF32, full), cv = Tensor::HostEmpty(DType::kF32, full);
      for (int64_t hh = 0; hh < p.n_kv; ++hh) {
        for (int64_t t = 0; t < p.cap; ++t) {
          for (int64_t d = 0; d < p.hd; ++d) {
            const uint16_t kb = F32ToBf16(std::uniform_real_distribution<float>(-2, 2)(rng));
            const uint16_t vb = F32ToBf16(std::uniform_real_distribution<float>(-2, 2)(rng));
            const int64_t at = (hh * r.rows + t) * r.stride + d, flat = (hh * p.cap + t) * p.hd + d;
            static_cast<uint16_t*>(r.k)[at] = kb;
            static_cast<uint16_t*>(r.v)[at] = vb;
            ck.as<float>()[flat] = Bf16ToF32(kb);
            cv.as<float>()[flat] = Bf16ToF32(vb);
          }
        }
      }
      cs.host_k[l] = cs.k[l] = ck;
      cs.host_v[l] = cs.v[l] = cv;
      // Sentinels: every slot no copy writes keeps them.
      Tensor sent = Tensor::HostEmpty(DType::kF32, slots);
      for (int64_t e = 0; e < sent.numel(); ++e) sent.as<float>()[e] = Bf16ToF32(F32ToBf16(1000.0f + e % 97));
      for (int part = 0; part < 2; ++part) {
        auto gs = gpu->ToDevice(sent, DType::kBF16, MemoryKind::kPrefetch);
        ASSERT_TRUE(gs.ok());
        Tensor cslot = Tensor::HostEmpty(DType::kF32, slots);
        std::memcpy(cslot.data(), sent.data(), sent.nbytes());
        (part == 0 ? g[i]->slot_k : g[i]->slot_v)[l] = *gs;
        (part == 0 ? cs.slot_k : cs.slot_v)[l] = cslot;
      }
    }
    for (int l = 0; l < p.gpu_layers; ++l) {  // resident layers: unused by the loads, present for the batch
      cs.k[l] = Tensor::HostEmpty(DType::kF32, full);
      cs.v[l] = Tensor::HostEmpty(DType::kF32, full);
    }
  }
  BatchDesc gb, cb;
  for (int i = 0; i < n_seqs; ++i) {
    gb.seqs.push_back({i, 1, past[i]});
    gb.kv.push_back(g[i].get());
    cb.seqs.push_back({i, 1, past[i]});
    cb.kv.push_back(&h[i]);
  }
  gb.n_tokens = cb.n_tokens = n_seqs;
  absl::Status st = gpu->PrepareBatch(gb);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(cpu->PrepareBatch(cb).ok());
  // Each offloaded layer appends the new token's rows (its own in the group's rows), then two rounds of loads.
  for (int l = p.gpu_layers; l < p.n_layers; ++l) {
    Tensor nk = RandomHost({n_seqs, p.n_kv, p.hd}, rng), nv = RandomHost({n_seqs, p.n_kv, p.hd}, rng);
    for (int64_t e = 0; e < nk.numel(); ++e) {
      nk.as<float>()[e] = Bf16ToF32(F32ToBf16(nk.as<float>()[e]));
      nv.as<float>()[e] = Bf16ToF32(F32ToBf16(nv.as<float>()[e]));
    }
    auto gk = gpu->ToDevice(nk, DType::kBF16, MemoryKind::kWorkspace);
    auto gv = gpu->ToDevice(nv, DType::kBF16, MemoryKind::kWorkspace);
    ASSERT_TRUE(gk.ok() && gv.ok());
    st = gpu->KvAppendHost(l, *gk, *gv);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(cpu->KvAppendHost(l, nk, nv).ok());
  }
  const std::vector<int> len = {past[0] + 1, past[1] + 1};
  for (int round = 0; round < 2; ++round) {
    const CopyList cl = RandomList(n_seqs, p.n_kv, p.budget, len, rng);
    ElasticCounters gc, cc;
    st = gpu->ElasticLoadLayers(p.gpu_layers, p.n_layers - p.gpu_layers, cl, &gc);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(cpu->ElasticLoadLayers(p.gpu_layers, p.n_layers - p.gpu_layers, cl, &cc).ok());
    EXPECT_EQ(gc.rows_loaded, cc.rows_loaded);
    EXPECT_EQ(gc.bytes_loaded * 2, cc.bytes_loaded);  // bf16 vs f32 rows
    ASSERT_TRUE(dynamic_cast<cuda::CudaBackend&>(*gpu).SyncCopyStream().ok());
    ASSERT_TRUE(gpu->Synchronize().ok());
    for (int i = 0; i < n_seqs; ++i) {
      for (int l = p.gpu_layers; l < p.n_layers; ++l) {
        for (int part = 0; part < 2; ++part) {
          const Tensor got = DeviceToF32(*gpu, part == 0 ? g[i]->slot_k[l] : g[i]->slot_v[l]);
          const Tensor& want = part == 0 ? h[i].slot_k[l] : h[i].slot_v[l];
          int bad = 0;
          for (int64_t e = 0; e < got.numel() && bad < 5; ++e) {
            if (got.as<float>()[e] != want.as<float>()[e]) {
              ADD_FAILURE() << "round " << round << " seq " << i << " layer " << l << (part == 0 ? " K" : " V")
                            << " element " << e << ": " << got.as<float>()[e] << " vs " << want.as<float>()[e];
              ++bad;
            }
          }
        }
        // The append landed in this layer's place of the group's rows.
        const KvRowsView r = KvRowsOf(g[i]->host_k[l], g[i]->host_v[l]);
        for (int hh = 0; hh < p.n_kv; ++hh) {
          for (int d = 0; d < p.hd; ++d) {
            const int64_t at = (int64_t(hh) * r.rows + past[i]) * r.stride + d, flat = (hh * p.cap + past[i]) * p.hd + d;
            ASSERT_EQ(static_cast<const uint16_t*>(r.k)[at], F32ToBf16(h[i].host_k[l].as<float>()[flat]));
            ASSERT_EQ(static_cast<const uint16_t*>(r.v)[at], F32ToBf16(h[i].host_v[l].as<float>()[flat]));
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLayerGroupTest,
                         ::testing::Values(GroupCase{6, 1, 4, 2, 64, 300, 48}, GroupCase{6, 0, 3, 8, 128, 257, 64},
                                           GroupCase{5, 2, 4, 4, 128, 100, 100}, GroupCase{4, 1, 6, 1, 64, 40, 8},
                                           GroupCase{4, 1, 1, 3, 64, 77, 16}));

}  // namespace
}  // namespace specontext::testing
