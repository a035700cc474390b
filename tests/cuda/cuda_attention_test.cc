// KV append and attention of the CUDA backend against the CPU backend on ragged batches: prefill
// with and without past tokens, decode with different lengths (split-K and not), GQA ratios 1..16,
// tensor-core head dims (64, 128) and the simple kernel (8, 32). Cache rows past each sequence's
// valid length hold NaN sentinels: attention must never read them and append must not touch them.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

constexpr uint16_t kNanBits = 0x7fc1;  // a bf16 quiet NaN with a payload: the sentinel
constexpr int kLayers = 2;

struct SeqSpec {
  int past;
  int n;
};

struct Case {
  int head_dim;
  int n_kv;
  int group;
  std::vector<SeqSpec> seqs;
};

std::string Name(const Case& c) {
  std::string s = absl::StrCat("hd=", c.head_dim, " n_kv=", c.n_kv, " group=", c.group, " seqs=");
  for (const SeqSpec& q : c.seqs) absl::StrAppend(&s, "(", q.past, "+", q.n, ")");
  return s;
}

struct SeqState {
  int cap = 0;
  std::vector<std::vector<uint16_t>> k_bits, v_bits;  // expected GPU cache contents per layer
  SequenceKv cpu_kv, gpu_kv;
};

Tensor Bf16Host(const std::vector<uint16_t>& bits, const Shape& shape) {
  Tensor t = Tensor::HostEmpty(DType::kBF16, shape);
  std::memcpy(t.data(), bits.data(), bits.size() * 2);
  return t;
}

Tensor F32FromBits(const std::vector<uint16_t>& bits, const Shape& shape) {
  Tensor t = Tensor::HostEmpty(DType::kF32, shape);
  for (size_t i = 0; i < bits.size(); ++i) t.as<float>()[i] = bits[i] == kNanBits ? 0.0f : Bf16ToF32(bits[i]);
  return t;
}

// One step: append k/v for every sequence at its past_len, attend, compare, check the caches.
void Step(Backend& cpu, Backend& gpu, const Case& c, std::vector<SeqState>& st, const std::vector<SeqSpec>& step,
          std::mt19937& rng, const std::string& what) {
  const int hd = c.head_dim, n_heads = c.n_kv * c.group;
  BatchDesc cb, gb;
  int t0 = 0;
  for (size_t i = 0; i < step.size(); ++i) {
    SeqSlice s{t0, step[i].n, step[i].past};
    cb.seqs.push_back(s);
    gb.seqs.push_back(s);
    cb.kv.push_back(&st[i].cpu_kv);
    gb.kv.push_back(&st[i].gpu_kv);
    t0 += step[i].n;
  }
  cb.n_tokens = gb.n_tokens = t0;
  const int layer = 1;
  Tensor k = RandomHost({t0, c.n_kv, hd}, rng), v = RandomHost({t0, c.n_kv, hd}, rng);
  Tensor q = RandomHost({t0, n_heads, hd}, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto ck = *cpu.ToDevice(k, DType::kF32, MemoryKind::kOther), cv = *cpu.ToDevice(v, DType::kF32, MemoryKind::kOther);
  auto cq = *cpu.ToDevice(q, DType::kF32, MemoryKind::kOther);
  auto cout = *cpu.Alloc(DType::kF32, {t0, n_heads, hd}, MemoryKind::kOther);
  ASSERT_TRUE(cpu.PrepareBatch(cb).ok());
  ASSERT_TRUE(cpu.KvAppend(layer, ck, cv).ok());
  ASSERT_TRUE(cpu.Attention(layer, cq, scale, &cout).ok());

  auto gk = *gpu.ToDevice(k, DType::kBF16, MemoryKind::kWorkspace);
  auto gv = *gpu.ToDevice(v, DType::kBF16, MemoryKind::kWorkspace);
  auto gq = *gpu.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
  Tensor poison = RandomHost({t0, n_heads, hd}, rng, 50.0f, 60.0f);
  auto gout = *gpu.ToDevice(poison, DType::kBF16, MemoryKind::kWorkspace);
  absl::Status s = gpu.PrepareBatch(gb);
  ASSERT_TRUE(s.ok()) << s;
  s = gpu.KvAppend(layer, gk, gv);
  ASSERT_TRUE(s.ok()) << s;
  s = gpu.Attention(layer, gq, scale, &gout);
  ASSERT_TRUE(s.ok()) << s;
  // A second call reuses the plan: it must give the same result.
  auto gout2 = *gpu.Alloc(DType::kBF16, {t0, n_heads, hd}, MemoryKind::kWorkspace);
  ASSERT_TRUE(gpu.Attention(layer, gq, scale, &gout2).ok());
  Tensor got = DeviceToF32(gpu, gout);
  ExpectClose(got, cout, {2e-2, 2e-2, 1.5e-2}, what + " attention");
  Tensor got2 = DeviceToF32(gpu, gout2);
  EXPECT_EQ(std::memcmp(got.data(), got2.data(), got.nbytes()), 0) << what << ": attention not repeatable";

  // Expected caches: new rows at past_len + t (bf16 of k/v), everything else untouched.
  for (size_t i = 0; i < step.size(); ++i) {
    for (int t = 0; t < step[i].n; ++t) {
      for (int h = 0; h < c.n_kv; ++h) {
        for (int d = 0; d < hd; ++d) {
          const size_t src = (size_t(cb.seqs[i].token_begin + t) * c.n_kv + h) * hd + d;
          const size_t dst = (size_t(h) * st[i].cap + step[i].past + t) * hd + d;
          st[i].k_bits[layer][dst] = F32ToBf16(k.as<float>()[src]);
          st[i].v_bits[layer][dst] = F32ToBf16(v.as<float>()[src]);
        }
      }
    }
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const Tensor& dev = kv == 0 ? st[i].gpu_kv.k[l] : st[i].gpu_kv.v[l];
        const auto& want = kv == 0 ? st[i].k_bits[l] : st[i].v_bits[l];
        Tensor host = Tensor::HostEmpty(DType::kBF16, dev.shape());
        ASSERT_TRUE(gpu.ToHost(dev, &host).ok());
        EXPECT_EQ(std::memcmp(host.data(), want.data(), want.size() * 2), 0)
            << what << ": cache of sequence " << i << " layer " << l << (kv == 0 ? " K" : " V")
            << " differs from the expected (appended rows or sentinels)";
      }
    }
  }
}

void RunCase(Backend& gpu, const Case& c) {
  std::mt19937 rng(FreshSeed());
  auto cpu = MakeCpuBackend();
  const int hd = c.head_dim;
  std::vector<SeqState> st(c.seqs.size());
  for (size_t i = 0; i < c.seqs.size(); ++i) {
    // Room for this step, one decode step after it, and a few spare (sentinel) rows.
    st[i].cap = c.seqs[i].past + c.seqs[i].n + 1 + static_cast<int>(rng() % 8);
    const Shape shape{c.n_kv, st[i].cap, hd};
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        Tensor r = RandomHost(shape, rng);
        std::vector<uint16_t> bits(r.numel());
        for (int h = 0; h < c.n_kv; ++h) {
          for (int p = 0; p < st[i].cap; ++p) {
            for (int d = 0; d < hd; ++d) {
              const size_t idx = (size_t(h) * st[i].cap + p) * hd + d;
              bits[idx] = p < c.seqs[i].past ? F32ToBf16(r.as<float>()[idx]) : kNanBits;
            }
          }
        }
        auto gdev = gpu.ToDevice(Bf16Host(bits, shape), DType::kBF16, MemoryKind::kKvCache);
        ASSERT_TRUE(gdev.ok()) << gdev.status();
        auto cdev = cpu->ToDevice(F32FromBits(bits, shape), DType::kF32, MemoryKind::kKvCache);
        (kv == 0 ? st[i].gpu_kv.k : st[i].gpu_kv.v).push_back(*gdev);
        (kv == 0 ? st[i].cpu_kv.k : st[i].cpu_kv.v).push_back(*cdev);
        (kv == 0 ? st[i].k_bits : st[i].v_bits).push_back(bits);
      }
    }
    st[i].gpu_kv.capacity = st[i].cpu_kv.capacity = st[i].cap;
  }
  Step(*cpu, gpu, c, st, c.seqs, rng, Name(c) + " step 1");
  std::vector<SeqSpec> decode;
  for (const SeqSpec& s : c.seqs) decode.push_back({s.past + s.n, 1});
  Step(*cpu, gpu, c, st, decode, rng, Name(c) + " decode step");
}

TEST(CudaAttentionTest, PrefillRaggedWithPast) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 2, 4, {{0, 17}, {100, 70}, {3, 1}, {2049, 5}}});
  RunCase(*gpu, {64, 4, 1, {{0, 97}, {33, 1}, {0, 1}}});
  RunCase(*gpu, {128, 1, 8, {{5, 130}}});
  RunCase(*gpu, {128, 2, 5, {{50, 3}, {1000, 1}}});
  RunCase(*gpu, {64, 8, 8, {{0, 33}, {7, 2}}});
}

TEST(CudaAttentionTest, LongPrefill) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {128, 2, 4, {{0, 600}}});
  RunCase(*gpu, {64, 1, 4, {{1500, 300}}});
}

TEST(CudaAttentionTest, DecodeDifferentLengthsSplitK) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {64, 2, 8, {{0, 1}, {16, 1}, {96, 1}, {2048, 1}, {5000, 1}}});
  RunCase(*gpu, {128, 8, 4, {{2049, 1}, {17, 1}}});
  RunCase(*gpu, {128, 1, 16, {{300, 1}, {9000, 1}}});
  RunCase(*gpu, {128, 4, 1, {{1, 1}, {4097, 1}, {130, 1}}});
}

TEST(CudaAttentionTest, SimpleKernelHeadDims) {
  SPC_GPU_OR_SKIP(gpu);
  RunCase(*gpu, {32, 2, 4, {{10, 20}, {40, 1}}});
  RunCase(*gpu, {8, 4, 2, {{0, 9}, {7, 1}}});
  RunCase(*gpu, {80, 2, 1, {{3, 4}}});
}

TEST(CudaAttentionTest, RejectsBadBatches) {
  SPC_GPU_OR_SKIP(gpu);
  auto k = *gpu->Alloc(DType::kBF16, {1, 4, 64}, MemoryKind::kKvCache);
  SequenceKv kv;
  kv.k = {k};
  kv.v = {k};
  kv.capacity = 4;
  BatchDesc b;
  b.seqs = {{0, 3, 2}};  // needs 5 slots
  b.kv = {&kv};
  b.n_tokens = 3;
  EXPECT_EQ(gpu->PrepareBatch(b).code(), absl::StatusCode::kOutOfRange);
  b.seqs = {{0, 2, 0}};  // n_tokens 3 but slices sum to 2
  EXPECT_EQ(gpu->PrepareBatch(b).code(), absl::StatusCode::kInvalidArgument);
  auto q = *gpu->Alloc(DType::kBF16, {2, 2, 64}, MemoryKind::kWorkspace);
  EXPECT_EQ(gpu->Attention(0, q, 1.0f, &q).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace specontext::testing
