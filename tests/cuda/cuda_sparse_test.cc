// KV tiers and sparse decode of the CUDA backend against the CPU backend (core/cpu/cpu_sparse.cc) and the
// core/sparse references, on fresh random inputs: sparse attention over index sets for resident and
// offloaded layers (GQA 1/2/3/4/8/12/16, head_dim 32/64/80/128/256, lengths 1 to 5000, odd budgets, head- and
// batch-level sets, split-K; both the tensor-core and the generic kernel), elastic
// loads over several steps (slot buffers bit-exact against a host mirror, sentinel rows around and between
// them untouched), KV appends to pinned host memory, pinned host accounting; per-sequence dense resident
// layers (SparseDecodeDesc::dense_resident: flagged sequences read every past position in the resident layer,
// their sets in the offloaded one). Selection: cuda_selection_test.cc.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

constexpr uint16_t kSentinel = 0x7fc3;  // bf16 NaN with a payload: must never be read nor overwritten
constexpr int kPadRows = 3;              // sentinel rows before and after each slot buffer (per tensor)

struct Case {
  int head_dim;
  int n_kv;
  int group;
  int budget;
  bool batch_level;
  std::vector<int> lens;  // past tokens per sequence
  std::vector<uint8_t> dense = {};  // SparseDecodeDesc::dense_resident (empty: none)
};

std::string Name(const Case& c) {
  std::string s = absl::StrCat("hd=", c.head_dim, " n_kv=", c.n_kv, " group=", c.group, " B=", c.budget,
                               c.batch_level ? " batch-level" : " head-level", " lens=");
  for (int l : c.lens) absl::StrAppend(&s, l, ",");
  if (!c.dense.empty()) absl::StrAppend(&s, " dense=");
  for (uint8_t d : c.dense) absl::StrAppend(&s, d, ",");
  return s;
}

// A random set of at most `budget` distinct positions of [0, len), ascending; `keep` of the previous set
// (fraction) are kept when `prev` is given.
std::vector<int32_t> RandomSet(int len, int budget, std::mt19937& rng, const std::vector<int32_t>* prev = nullptr,
                               double keep = 0.0) {
  const int n = std::min(len, budget - static_cast<int>(rng() % 2));  // sometimes one short of the budget
  std::vector<int32_t> out;
  std::vector<char> used(len, 0);
  if (prev != nullptr) {
    for (int32_t p : *prev) {
      if (static_cast<int>(out.size()) < n && p < len && std::uniform_real_distribution<>(0, 1)(rng) < keep) {
        out.push_back(p);
        used[p] = 1;
      }
    }
  }
  std::vector<int32_t> rest;
  for (int p = 0; p < len; ++p) {
    if (!used[p]) rest.push_back(p);
  }
  std::shuffle(rest.begin(), rest.end(), rng);
  for (int32_t p : rest) {
    if (static_cast<int>(out.size()) >= n) break;
    out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}

IndexSets MakeSets(const Case& c, std::mt19937& rng, const IndexSets* prev, double keep) {
  IndexSets s;
  const int per = c.batch_level ? 1 : c.n_kv;
  s.Reset(static_cast<int>(c.lens.size()), c.n_kv, per, c.budget);
  for (size_t i = 0; i < c.lens.size(); ++i) {
    s.seq_len[i] = c.lens[i];
    for (int k = 0; k < per; ++k) {
      std::vector<int32_t> p, set;
      if (prev != nullptr) {
        auto v = prev->SetPositions(static_cast<int32_t>(i) * per + k);
        p.assign(v.begin(), v.end());
      }
      set = RandomSet(c.lens[i], c.budget, rng, prev ? &p : nullptr, keep);
      s.indices.insert(s.indices.end(), set.begin(), set.end());
      s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
    }
  }
  return s;
}

Tensor Bf16Host(const std::vector<uint16_t>& bits, const Shape& shape) {
  Tensor t = Tensor::HostEmpty(DType::kBF16, shape);
  std::memcpy(t.data(), bits.data(), bits.size() * 2);
  return t;
}

std::vector<uint16_t> ToBits(const Tensor& f32) {
  std::vector<uint16_t> b(f32.numel());
  for (int64_t i = 0; i < f32.numel(); ++i) b[i] = F32ToBf16(f32.as<float>()[i]);
  return b;
}

// One sequence on both backends, with layer 0 resident and layer 1 offloaded.
struct Seq {
  int cap = 0;
  std::vector<uint16_t> k_bits, v_bits;  // past K/V of both layers (same values), [n_kv, cap, hd]
  SequenceKv cpu, gpu;
  Tensor gpu_slot_k_full, gpu_slot_v_full;   // [n_kv, budget + 2 * kPadRows, hd] incl. sentinels
  std::vector<uint16_t> slot_k_mirror, slot_v_mirror;  // expected content of the full buffers
  SlotMap map{1, 1};
};

constexpr int kLayers = 2;  // layer 0 resident, layer 1 offloaded (the last layer, as the planner does)

void SetUp(Backend& cpu, Backend& gpu, const Case& c, std::mt19937& rng, std::vector<Seq>& seqs) {
  const int hd = c.head_dim, per = c.batch_level ? 1 : c.n_kv;
  seqs.resize(c.lens.size());
  for (size_t i = 0; i < c.lens.size(); ++i) {
    Seq& s = seqs[i];
    s.cap = c.lens[i] + 1 + static_cast<int>(rng() % 4);
    const Shape shape{c.n_kv, s.cap, hd};
    s.k_bits = ToBits(RandomHost(shape, rng));
    s.v_bits = ToBits(RandomHost(shape, rng));
    for (int l = 0; l < kLayers; ++l) {
      Tensor fk = Tensor::HostEmpty(DType::kF32, shape), fv = Tensor::HostEmpty(DType::kF32, shape);
      ConvertToF32(s.k_bits.data(), DType::kBF16, fk.as<float>(), fk.numel());
      ConvertToF32(s.v_bits.data(), DType::kBF16, fv.as<float>(), fv.numel());
      if (l == 0) {
        s.cpu.k.push_back(*cpu.ToDevice(fk, DType::kF32, MemoryKind::kKvCache));
        s.cpu.v.push_back(*cpu.ToDevice(fv, DType::kF32, MemoryKind::kKvCache));
        s.gpu.k.push_back(*gpu.ToDevice(Bf16Host(s.k_bits, shape), DType::kBF16, MemoryKind::kKvCache));
        s.gpu.v.push_back(*gpu.ToDevice(Bf16Host(s.v_bits, shape), DType::kBF16, MemoryKind::kKvCache));
        continue;
      }
      auto hk = cpu.AllocPinnedHost(DType::kF32, shape, MemoryKind::kKvCache);
      auto hv = cpu.AllocPinnedHost(DType::kF32, shape, MemoryKind::kKvCache);
      ASSERT_TRUE(hk.ok() && hv.ok());
      std::memcpy(hk->data(), fk.data(), fk.nbytes());
      std::memcpy(hv->data(), fv.data(), fv.nbytes());
      s.cpu.host_k = {Tensor(), *hk};
      s.cpu.host_v = {Tensor(), *hv};
      s.cpu.k.push_back(*hk);
      s.cpu.v.push_back(*hv);
      s.cpu.slot_k = {Tensor(), *cpu.Alloc(DType::kF32, {c.n_kv, c.budget, hd}, MemoryKind::kPrefetch)};
      s.cpu.slot_v = {Tensor(), *cpu.Alloc(DType::kF32, {c.n_kv, c.budget, hd}, MemoryKind::kPrefetch)};
      auto gk = gpu.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache);
      auto gv = gpu.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache);
      ASSERT_TRUE(gk.ok() && gv.ok()) << gk.status() << gv.status();
      std::memcpy(gk->data(), s.k_bits.data(), s.k_bits.size() * 2);
      std::memcpy(gv->data(), s.v_bits.data(), s.v_bits.size() * 2);
      s.gpu.host_k = {Tensor(), *gk};
      s.gpu.host_v = {Tensor(), *gv};
      s.gpu.k.push_back(*gk);
      s.gpu.v.push_back(*gv);
      // Slot buffers carved out of a larger allocation: sentinel rows before and after every head's slots.
      const int rows = c.budget + 2 * kPadRows;
      const Shape full{c.n_kv, rows, hd};
      s.slot_k_mirror.assign(NumElements(full), kSentinel);
      s.slot_v_mirror.assign(NumElements(full), kSentinel);
      s.gpu_slot_k_full = *gpu.ToDevice(Bf16Host(s.slot_k_mirror, full), DType::kBF16, MemoryKind::kPrefetch);
      s.gpu_slot_v_full = *gpu.ToDevice(Bf16Host(s.slot_v_mirror, full), DType::kBF16, MemoryKind::kPrefetch);
    }
    s.cpu.capacity = s.gpu.capacity = s.cap;
    s.cpu.slot_budget = s.gpu.slot_budget = c.budget;
    s.map = SlotMap(per, c.budget);
  }
}

// The backend's slot buffers [n_kv, budget, hd] are views into padded allocations of
// n_kv * (budget + 2 * kPadRows) rows starting kPadRows rows in: head h's slot r is row kPadRows + h * budget
// + r, with sentinel rows before the view and after it.
void SlotViews(const Case& c, Seq& s) {
  const int64_t row_elems = c.head_dim;
  auto view = [&](const Tensor& full) {
    return Tensor(static_cast<uint16_t*>(full.data()) + kPadRows * row_elems, DType::kBF16,
                  {c.n_kv, c.budget, c.head_dim}, DeviceKind::kCuda, full.storage());
  };
  s.gpu.slot_k = {Tensor(), view(s.gpu_slot_k_full)};
  s.gpu.slot_v = {Tensor(), view(s.gpu_slot_v_full)};
}

// Applies a copy list to the host mirror of the padded GPU buffers (flat layout as SlotViews describes).
void MirrorCopies(const Case& c, const CopyList& cl, int seq, Seq& s) {
  const int hd = c.head_dim;
  const int heads = cl.sets_per_seq == 1 ? c.n_kv : 1;
  for (int k = 0; k < cl.sets_per_seq; ++k) {
    const int set = seq * cl.sets_per_seq + k;
    for (int j = cl.copy_ptr[set]; j < cl.copy_ptr[set + 1]; ++j) {
      for (int hh = 0; hh < heads; ++hh) {
        const int g = heads == 1 ? k : hh;
        const size_t src = (size_t(g) * s.cap + cl.copies[j].token) * hd;
        const size_t dst = (size_t(kPadRows) + size_t(g) * c.budget + cl.copies[j].slot) * hd;
        std::copy_n(s.k_bits.begin() + src, hd, s.slot_k_mirror.begin() + dst);
        std::copy_n(s.v_bits.begin() + src, hd, s.slot_v_mirror.begin() + dst);
      }
    }
  }
}

void ExpectBitsEqual(Backend& gpu, const Tensor& dev, const std::vector<uint16_t>& want, const std::string& what) {
  Tensor host = Tensor::HostEmpty(DType::kBF16, dev.shape());
  ASSERT_TRUE(gpu.ToHost(dev, &host).ok());
  const uint16_t* got = host.as<uint16_t>();
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i] && bad++ == 0) first = static_cast<int64_t>(i);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements differ, first at " << first
                    << (first >= 0 && want[first] == kSentinel ? " (a sentinel was overwritten)" : "");
}

// One decode step: sets (kept from the last with probability `keep`), elastic plan, loads on both
// backends, sparse attention of both layers on both backends.
void Step(Backend& cpu, Backend& gpu, const Case& c, std::vector<Seq>& seqs, std::mt19937& rng, IndexSets* last,
          double keep, const std::string& what) {
  const int hd = c.head_dim, n_heads = c.n_kv * c.group, n = static_cast<int>(seqs.size());
  IndexSets sets = MakeSets(c, rng, last->n_seqs > 0 ? last : nullptr, keep);
  std::vector<const SlotMap*> cmaps;
  std::vector<SlotMap*> maps;
  for (Seq& s : seqs) {
    cmaps.push_back(&s.map);
    maps.push_back(&s.map);
  }
  auto plan = PlanElasticLoads(cmaps, sets);
  ASSERT_TRUE(plan.ok()) << plan.status();
  BatchDesc cb, gb;
  for (int i = 0; i < n; ++i) {
    cb.seqs.push_back({i, 1, c.lens[i]});
    gb.seqs.push_back({i, 1, c.lens[i]});
    cb.kv.push_back(&seqs[i].cpu);
    gb.kv.push_back(&seqs[i].gpu);
  }
  cb.n_tokens = gb.n_tokens = n;
  ASSERT_TRUE(cpu.PrepareBatch(cb).ok());
  absl::Status st = gpu.PrepareBatch(gb);
  ASSERT_TRUE(st.ok()) << st;
  SparseDecodeDesc desc;
  desc.sets = &sets;
  desc.slots = plan->slots;
  desc.dense_resident = c.dense;
  ASSERT_TRUE(cpu.PrepareSparseDecode(desc).ok());
  st = gpu.PrepareSparseDecode(desc);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  ElasticCounters cc, gc;
  st = cpu.ElasticLoad(1, plan->copies, &cc);
  ASSERT_TRUE(st.ok()) << st;
  st = gpu.ElasticLoad(1, plan->copies, &gc);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  EXPECT_EQ(cc.bytes_loaded * 2, gc.bytes_loaded * 4) << "f32 vs bf16 rows: byte counters disagree";
  EXPECT_EQ(cc.rows_loaded, gc.rows_loaded);
  for (int i = 0; i < n; ++i) MirrorCopies(c, plan->copies, i, seqs[i]);
  ASSERT_TRUE(ApplyElasticPlan(*plan, sets, maps).ok());

  Tensor q = RandomHost({n, n_heads, hd}, rng), kc = RandomHost({n, c.n_kv, hd}, rng);
  Tensor vc = RandomHost({n, c.n_kv, hd}, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto cq = *cpu.ToDevice(q, DType::kF32, MemoryKind::kOther), ck = *cpu.ToDevice(kc, DType::kF32, MemoryKind::kOther);
  auto cv = *cpu.ToDevice(vc, DType::kF32, MemoryKind::kOther);
  auto gq = *gpu.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
  auto gk = *gpu.ToDevice(kc, DType::kBF16, MemoryKind::kWorkspace);
  auto gv = *gpu.ToDevice(vc, DType::kBF16, MemoryKind::kWorkspace);
  for (int layer = 0; layer < kLayers; ++layer) {
    auto cout = *cpu.Alloc(DType::kF32, {n, n_heads, hd}, MemoryKind::kOther);
    ASSERT_TRUE(cpu.SparseAttention(layer, cq, ck, cv, scale, &cout).ok());
    auto gout = *gpu.ToDevice(RandomHost({n, n_heads, hd}, rng, 40.0f, 50.0f), DType::kBF16, MemoryKind::kWorkspace);
    st = gpu.SparseAttention(layer, gq, gk, gv, scale, &gout);
    ASSERT_TRUE(st.ok()) << what << " layer " << layer << ": " << st;
    ExpectClose(DeviceToF32(gpu, gout), cout, {2e-2, 2e-2, 1.5e-2},
                absl::StrCat(what, layer == 0 ? " resident" : " offloaded", " sparse attention"));
  }
  for (int i = 0; i < n; ++i) {
    ExpectBitsEqual(gpu, seqs[i].gpu_slot_k_full, seqs[i].slot_k_mirror, absl::StrCat(what, " seq ", i, " slot K"));
    ExpectBitsEqual(gpu, seqs[i].gpu_slot_v_full, seqs[i].slot_v_mirror, absl::StrCat(what, " seq ", i, " slot V"));
  }
  *last = std::move(sets);
}

void RunCase(Backend& gpu, const Case& c, int steps = 3) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  auto cpu = MakeCpuBackend();
  std::vector<Seq> seqs;
  SetUp(*cpu, gpu, c, rng, seqs);
  if (::testing::Test::HasFatalFailure()) return;
  for (Seq& s : seqs) SlotViews(c, s);
  IndexSets last;
  const double keeps[] = {0.0, 0.9, 0.5, 0.95};
  for (int t = 0; t < steps; ++t) {
    Step(*cpu, gpu, c, seqs, rng, &last, keeps[t % 4], absl::StrCat(Name(c), " step ", t, " seed ", seed));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(CudaSparseTest, AttentionAndElasticHeadLevel) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 2, 4, 7, false, {1, 17, 2049}});
  RunCase(*gpu, {128, 8, 1, 33, false, {17, 40}});
  RunCase(*gpu, {64, 1, 8, 2048, false, {2049, 1, 300}});
  RunCase(*gpu, {128, 2, 8, 1025, false, {2049, 5000, 17}}, 4);
}

TEST(CudaSparseTest, AttentionAndElasticBatchLevel) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 4, 4, 65, true, {17, 2049, 1}});
  RunCase(*gpu, {256, 2, 2, 31, true, {100}});
}

// The tensor-core kernel (head_dim 64/128, group <= 8): GQA 1/4/8, odd budgets, batches of different
// lengths (one split or many per list, lists shorter than a warp tile).
TEST(CudaSparseTest, TensorCoreKernelShapes) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {64, 8, 4, 257, false, {3000, 17, 1, 700, 256}});
  RunCase(*gpu, {128, 8, 8, 2047, false, {4100, 2047, 5}});
  RunCase(*gpu, {64, 2, 1, 101, false, {1, 2, 150, 99, 102}});
  RunCase(*gpu, {128, 4, 1, 4095, false, {5000, 4095}});
  RunCase(*gpu, {64, 4, 8, 31, true, {40, 33, 3}});
  std::vector<int> lens;
  for (int i = 0; i < 12; ++i) lens.push_back(1 + 397 * i);
  RunCase(*gpu, {128, 2, 4, 1000, false, lens}, 2);
}

// The weak-retrieval fallback per sequence: flagged sequences attend to their whole past in the resident
// layer (the CPU backend's reference: sets of every past position) and to their sets in the offloaded one,
// beside unflagged ones; both kernels, head- and batch-level sets, lists far longer than the budget (split-K
// planned for the resident layer's longest list).
TEST(CudaSparseTest, DenseResidentSequences) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 2, 4, 7, false, {1, 17, 2049}, {0, 1, 1}});
  RunCase(*gpu, {64, 8, 4, 257, false, {3000, 17, 1, 700, 256}, {1, 0, 1, 1, 0}});
  RunCase(*gpu, {128, 8, 8, 33, false, {5000, 97}, {0, 1}}, 4);
  RunCase(*gpu, {128, 4, 4, 65, true, {17, 2049, 1}, {0, 1, 0}});
  RunCase(*gpu, {80, 2, 3, 33, false, {50, 17, 2049}, {1, 0, 1}});  // generic kernel (head_dim 80)
  RunCase(*gpu, {128, 1, 12, 65, false, {300, 97}, {1, 1}});        // generic kernel (group 12)
  RunCase(*gpu, {64, 2, 1, 101, false, {1, 2, 150}, {1, 1, 1}});
}

TEST(CudaSparseTest, WideHeadsAndLargeGroups) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {256, 1, 16, 129, false, {2049, 60}});
  RunCase(*gpu, {32, 4, 2, 9, false, {17, 1}});
  RunCase(*gpu, {80, 2, 3, 33, false, {50, 17}});  // head_dim not a multiple of 32: the generic kernel
  RunCase(*gpu, {128, 1, 12, 65, false, {300}});   // group > 8: the generic kernel
}

}  // namespace
}  // namespace specontext::testing
