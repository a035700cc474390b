// The fused decode kernels: the fused RoPE + KV append (Backend::RopeKvAppend, kernels/rope.cu) and the
// sparse attention's split merge (kernels/sparse_attention.cu) at one sequence.
//
// RopeKvAppend on CUDA must give the bits of its two-op form (Rope of q and k, then KvAppend: the base class
// default, run on the same GPU backend) for q, k and both caches, and match the CPU backend within bf16
// bounds. Shapes: the 1B model's (32 q heads, 8 KV heads, head_dim 64), a Qwen3-like one (head_dim 128), GQA
// and MHA, interleaved pairs with a YaRN-like scaling, positions past 60000; one decode row whose q and k are
// views into one qkv row (as the Transformer makes them) and ragged batches of prefill chunks and decode rows.
// Cache rows around the appended ones are random and must stay as they were.
//
// The sparse attention at one sequence with many splits (33 at 2K: the merge is most of the work), head dims
// 64/128 (tensor-core kernel) and 96 (generic kernel), and sharp scores (large q) so that the splits'
// log-sum-exps lie far apart, against the CPU backend.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/sparse/index_sets.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct SeqSpec {
  int past;
  int n;
};

struct RopeCase {
  int n_heads, n_kv, head_dim;
  bool interleaved;
  float scaling;
  int pos_offset;  // rotation position = cache position + pos_offset
  std::vector<SeqSpec> seqs;
};

std::string Name(const RopeCase& c) {
  std::string s = absl::StrCat("heads=", c.n_heads, " kv=", c.n_kv, " hd=", c.head_dim,
                               c.interleaved ? " interleaved" : "", " scaling=", c.scaling, " +pos=", c.pos_offset,
                               " seqs=");
  for (const SeqSpec& q : c.seqs) absl::StrAppend(&s, "(", q.past, "+", q.n, ")");
  return s;
}

Tensor HostI32(const std::vector<int32_t>& v) {
  Tensor t = Tensor::HostEmpty(DType::kI32, {static_cast<int64_t>(v.size())});
  std::memcpy(t.data(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

std::vector<uint16_t> Bits(Backend& gpu, const Tensor& dev) {
  Tensor host = Tensor::HostEmpty(DType::kBF16, dev.shape());
  EXPECT_TRUE(gpu.ToHost(dev, &host).ok());
  std::vector<uint16_t> out(dev.numel());
  std::memcpy(out.data(), host.data(), out.size() * 2);
  return out;
}

void ExpectSameBits(Backend& gpu, const Tensor& a, const Tensor& b, const std::string& what) {
  const std::vector<uint16_t> x = Bits(gpu, a), y = Bits(gpu, b);
  ASSERT_EQ(x.size(), y.size()) << what;
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] != y[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << x.size() << " elements differ, first at " << first;
}

// One backend's side of a RopeKvAppend case: caches (one layer), inputs and the batch.
struct Side {
  std::vector<SequenceKv> kv;
  Tensor qkv, q, k, v, pos, inv_freq;  // q, k: views of qkv (one row) or tensors of their own
};

void Build(Backend& b, const RopeCase& c, const std::vector<Tensor>& k_init, const std::vector<Tensor>& v_init,
           const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pos, const Tensor& inv_freq, Side* s) {
  const DType dt = b.compute_dtype();
  s->kv.resize(c.seqs.size());
  for (size_t i = 0; i < c.seqs.size(); ++i) {
    s->kv[i].capacity = static_cast<int32_t>(k_init[i].dim(1));
    s->kv[i].k.push_back(*b.ToDevice(k_init[i], dt, MemoryKind::kKvCache));
    s->kv[i].v.push_back(*b.ToDevice(v_init[i], dt, MemoryKind::kKvCache));
  }
  const int64_t n = q.dim(0), hd = c.head_dim;
  if (n == 1) {
    // The Transformer's decode layout: q, k and v adjacent in one qkv row.
    Tensor row = Tensor::HostEmpty(DType::kF32, {1, (c.n_heads + 2 * c.n_kv) * hd});
    float* r = row.as<float>();
    std::memcpy(r, q.data(), q.nbytes());
    std::memcpy(r + c.n_heads * hd, k.data(), k.nbytes());
    std::memcpy(r + (c.n_heads + c.n_kv) * hd, v.data(), v.nbytes());
    s->qkv = *b.ToDevice(row, dt, MemoryKind::kWorkspace);
    const size_t es = DTypeSize(dt);
    char* base = static_cast<char*>(s->qkv.data());
    s->q = Tensor(base, dt, {1, c.n_heads, hd}, s->qkv.device(), s->qkv.storage());
    s->k = Tensor(base + c.n_heads * hd * es, dt, {1, c.n_kv, hd}, s->qkv.device(), s->qkv.storage());
    s->v = Tensor(base + (c.n_heads + c.n_kv) * hd * es, dt, {1, c.n_kv, hd}, s->qkv.device(), s->qkv.storage());
  } else {
    s->q = *b.ToDevice(q, dt, MemoryKind::kWorkspace);
    s->k = *b.ToDevice(k, dt, MemoryKind::kWorkspace);
    s->v = *b.ToDevice(v, dt, MemoryKind::kWorkspace);
  }
  s->pos = *b.ToDevice(pos, DType::kI32, MemoryKind::kOther);
  s->inv_freq = *b.ToDevice(inv_freq, DType::kF32, MemoryKind::kWeights);
}

absl::Status Prepare(Backend& b, const RopeCase& c, Side& s) {
  BatchDesc batch;
  int32_t t0 = 0;
  for (size_t i = 0; i < c.seqs.size(); ++i) {
    batch.seqs.push_back({t0, c.seqs[i].n, c.seqs[i].past});
    batch.kv.push_back(&s.kv[i]);
    t0 += c.seqs[i].n;
  }
  batch.n_tokens = t0;
  return b.PrepareBatch(batch);
}

void RunRopeCase(Backend& gpu, const RopeCase& c) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const std::string what = absl::StrCat(Name(c), " seed ", seed);
  auto cpu = MakeCpuBackend();
  const int hd = c.head_dim;
  int n = 0;
  std::vector<Tensor> k_init, v_init;
  std::vector<int32_t> positions;
  for (const SeqSpec& q : c.seqs) {
    const int cap = q.past + q.n + 1 + static_cast<int>(rng() % 5);
    k_init.push_back(RandomHost({c.n_kv, cap, hd}, rng));
    v_init.push_back(RandomHost({c.n_kv, cap, hd}, rng));
    for (int t = 0; t < q.n; ++t) positions.push_back(q.past + t + c.pos_offset);
    n += q.n;
  }
  Tensor q = RandomHost({n, c.n_heads, hd}, rng), k = RandomHost({n, c.n_kv, hd}, rng);
  Tensor v = RandomHost({n, c.n_kv, hd}, rng);
  Tensor inv_freq = Tensor::HostEmpty(DType::kF32, {hd / 2});
  for (int j = 0; j < hd / 2; ++j) {
    inv_freq.as<float>()[j] = std::pow(500000.0f, -2.0f * j / hd) * (0.5f + std::uniform_real_distribution<float>()(rng));
  }
  const Tensor pos = HostI32(positions);
  Side cs, fused, plain;
  Build(*cpu, c, k_init, v_init, q, k, v, pos, inv_freq, &cs);
  Build(gpu, c, k_init, v_init, q, k, v, pos, inv_freq, &fused);
  Build(gpu, c, k_init, v_init, q, k, v, pos, inv_freq, &plain);
  auto args = [&](Side& s) { return RopeArgs{&s.inv_freq, c.interleaved, c.scaling}; };
  ASSERT_TRUE(Prepare(*cpu, c, cs).ok()) << what;
  ASSERT_TRUE(cpu->RopeKvAppend(0, &cs.q, &cs.k, cs.v, cs.pos, args(cs)).ok()) << what;
  absl::Status st = Prepare(gpu, c, plain);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  st = gpu.Backend::RopeKvAppend(0, &plain.q, &plain.k, plain.v, plain.pos, args(plain));  // the two-op form
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  st = Prepare(gpu, c, fused);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  st = gpu.RopeKvAppend(0, &fused.q, &fused.k, fused.v, fused.pos, args(fused));
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  ASSERT_TRUE(gpu.Synchronize().ok());

  ExpectSameBits(gpu, fused.q, plain.q, what + " q (fused vs two ops)");
  ExpectSameBits(gpu, fused.k, plain.k, what + " k (fused vs two ops)");
  ExpectSameBits(gpu, fused.v, plain.v, what + " v untouched");
  const Tolerance tol{2e-2, 2e-2, 1e-2};
  ExpectClose(DeviceToF32(gpu, fused.q), DeviceToF32(*cpu, cs.q), tol, what + " q vs CPU");
  ExpectClose(DeviceToF32(gpu, fused.k), DeviceToF32(*cpu, cs.k), tol, what + " k vs CPU");
  for (size_t i = 0; i < c.seqs.size(); ++i) {
    const std::string si = absl::StrCat(what, " seq ", i);
    ExpectSameBits(gpu, fused.kv[i].k[0], plain.kv[i].k[0], si + " K cache (fused vs two ops)");
    ExpectSameBits(gpu, fused.kv[i].v[0], plain.kv[i].v[0], si + " V cache (fused vs two ops)");
    ExpectClose(DeviceToF32(gpu, fused.kv[i].k[0]), DeviceToF32(*cpu, cs.kv[i].k[0]), tol, si + " K cache vs CPU");
    ExpectClose(DeviceToF32(gpu, fused.kv[i].v[0]), DeviceToF32(*cpu, cs.kv[i].v[0]), tol, si + " V cache vs CPU");
  }
}

TEST(CudaFusedDecodeTest, RopeKvAppendDecodeRow) {
  SPC_GPU_OR_SKIP(gpu);
  RunRopeCase(*gpu, {32, 8, 64, false, 1.0f, 0, {{2048, 1}}});     // Llama-3.2-1B
  RunRopeCase(*gpu, {32, 8, 64, false, 1.0f, 0, {{0, 1}}});        // the first token
  RunRopeCase(*gpu, {16, 8, 128, false, 1.0f, 0, {{4095, 1}}});    // Qwen3-like head_dim 128
  RunRopeCase(*gpu, {28, 4, 128, false, 1.0f, 60000, {{77, 1}}});  // GQA 7, far positions
  RunRopeCase(*gpu, {8, 8, 64, true, 1.3f, 0, {{300, 1}}});        // MHA, interleaved pairs, scaled cos/sin
  RunRopeCase(*gpu, {4, 1, 32, false, 1.0f, 5, {{9, 1}}});         // small head_dim
}

TEST(CudaFusedDecodeTest, RopeKvAppendRaggedBatches) {
  SPC_GPU_OR_SKIP(gpu);
  RunRopeCase(*gpu, {32, 8, 64, false, 1.0f, 0, {{100, 1}, {0, 37}, {5, 1}, {2000, 3}}});
  RunRopeCase(*gpu, {16, 8, 128, false, 1.0f, 0, {{0, 130}, {64, 1}}});
  RunRopeCase(*gpu, {12, 2, 128, true, 0.9f, 1000, {{1, 2}, {17, 1}, {0, 5}}});
  RunRopeCase(*gpu, {32, 8, 64, false, 1.0f, 0, {{7, 1}, {8, 1}, {9, 1}, {4096, 1}}});  // a decode batch
}

// ---- sparse attention at one sequence -----------------------------------------------------------------

struct SparseCase {
  int head_dim, n_kv, group, budget, len;
  float q_scale;  // q values in [-q_scale, q_scale)
};

void RunSparseCase(Backend& gpu, const SparseCase& c) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const std::string what = absl::StrCat("hd=", c.head_dim, " kv=", c.n_kv, " group=", c.group, " B=", c.budget,
                                        " len=", c.len, " q_scale=", c.q_scale, " seed ", seed);
  auto cpu = MakeCpuBackend();
  const int hd = c.head_dim, n_heads = c.n_kv * c.group;
  const int cap = c.len + 1 + static_cast<int>(rng() % 7);
  const Tensor kh = RandomHost({c.n_kv, cap, hd}, rng), vh = RandomHost({c.n_kv, cap, hd}, rng);
  SequenceKv ckv, gkv;
  ckv.capacity = gkv.capacity = cap;
  ckv.k.push_back(*cpu->ToDevice(kh, DType::kF32, MemoryKind::kKvCache));
  ckv.v.push_back(*cpu->ToDevice(vh, DType::kF32, MemoryKind::kKvCache));
  gkv.k.push_back(*gpu.ToDevice(kh, DType::kBF16, MemoryKind::kKvCache));
  gkv.v.push_back(*gpu.ToDevice(vh, DType::kBF16, MemoryKind::kKvCache));
  // Head-level sets: per KV head a random subset of [0, len) of at most `budget` positions, ascending.
  IndexSets sets;
  sets.Reset(1, c.n_kv, c.n_kv, c.budget);
  sets.seq_len[0] = c.len;
  std::vector<int32_t> all(c.len);
  std::iota(all.begin(), all.end(), 0);
  for (int g = 0; g < c.n_kv; ++g) {
    std::shuffle(all.begin(), all.end(), rng);
    const int take = std::min(c.len, c.budget - static_cast<int>(rng() % 3));
    std::vector<int32_t> set(all.begin(), all.begin() + take);
    std::sort(set.begin(), set.end());
    sets.indices.insert(sets.indices.end(), set.begin(), set.end());
    sets.indptr.push_back(static_cast<int32_t>(sets.indices.size()));
  }
  BatchDesc cb, gb;
  cb.seqs.push_back({0, 1, c.len});
  gb.seqs.push_back({0, 1, c.len});
  cb.kv.push_back(&ckv);
  gb.kv.push_back(&gkv);
  cb.n_tokens = gb.n_tokens = 1;
  ASSERT_TRUE(cpu->PrepareBatch(cb).ok());
  absl::Status st = gpu.PrepareBatch(gb);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  SparseDecodeDesc desc{&sets, {}};
  ASSERT_TRUE(cpu->PrepareSparseDecode(desc).ok());
  st = gpu.PrepareSparseDecode(desc);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  const Tensor q = RandomHost({1, n_heads, hd}, rng, -c.q_scale, c.q_scale);
  const Tensor kc = RandomHost({1, c.n_kv, hd}, rng), vc = RandomHost({1, c.n_kv, hd}, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Tensor cq = *cpu->ToDevice(q, DType::kF32, MemoryKind::kOther), ck = *cpu->ToDevice(kc, DType::kF32, MemoryKind::kOther);
  Tensor cv = *cpu->ToDevice(vc, DType::kF32, MemoryKind::kOther);
  Tensor cout = *cpu->Alloc(DType::kF32, {1, n_heads, hd}, MemoryKind::kOther);
  ASSERT_TRUE(cpu->SparseAttention(0, cq, ck, cv, scale, &cout).ok());
  Tensor gq = *gpu.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
  Tensor gk = *gpu.ToDevice(kc, DType::kBF16, MemoryKind::kWorkspace);
  Tensor gv = *gpu.ToDevice(vc, DType::kBF16, MemoryKind::kWorkspace);
  // Two calls into an output of garbage: the second must not depend on what the first left behind.
  for (int rep = 0; rep < 2; ++rep) {
    Tensor gout = *gpu.ToDevice(RandomHost({1, n_heads, hd}, rng, 40.0f, 50.0f), DType::kBF16, MemoryKind::kWorkspace);
    st = gpu.SparseAttention(0, gq, gk, gv, scale, &gout);
    ASSERT_TRUE(st.ok()) << what << ": " << st;
    ExpectClose(DeviceToF32(gpu, gout), cout, {2e-2, 2e-2, 1.5e-2}, absl::StrCat(what, " rep ", rep));
  }
}

TEST(CudaFusedDecodeTest, SparseAttentionOneSequenceManySplits) {
  SPC_GPU_OR_SKIP(gpu);
  RunSparseCase(*gpu, {64, 8, 4, 2048, 2048, 1.0f});    // benchmark 4's shape at 2K: every position
  RunSparseCase(*gpu, {64, 8, 4, 2048, 16384, 1.0f});   // and at 16K
  RunSparseCase(*gpu, {64, 8, 4, 2048, 4096, 8.0f});    // sharp scores: split lse far apart
  RunSparseCase(*gpu, {128, 8, 2, 2048, 8192, 4.0f});   // Qwen3-like head_dim 128
  RunSparseCase(*gpu, {128, 1, 8, 20000, 30000, 1.0f}); // one long list: hundreds of splits
  RunSparseCase(*gpu, {96, 2, 3, 1024, 3000, 4.0f});    // the generic kernel
  RunSparseCase(*gpu, {64, 8, 4, 2048, 40, 1.0f});      // one split
}

}  // namespace
}  // namespace specontext::testing
