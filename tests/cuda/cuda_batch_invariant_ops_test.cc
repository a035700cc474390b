// Batch-invariant mode of the CUDA backend at the op level (CudaBackendOptions::batch_invariant).
//
// Linear: for M in {1, 3, 16, 33, 128} rows, every row of the M-row result must equal bit for bit the same
// row computed alone (M = 1), for bf16 and f32 outputs, with a bias, at odd sizes and at a k that is not a
// multiple of 8 (element loads); both tiles of the kernel (16 and 64 rows) must agree; the result is checked
// against a double-precision reference. Decode attention: a decoding sequence's output must be bitwise the
// same alone, among 32 decoding sequences of other lengths, and in a mixed batch beside a prefilling
// sequence, and close to a reference (as must the prefill rows of the mixed batch). With the mode off the
// same comparisons are printed (max |diff|), not asserted: that is the batch dependence the mode removes.
// Sparse attention: a sequence's output over its index sets is the same alone and among 31 sequences whose
// sets and lengths change the default split plan.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/kernels/gemm_invariant.h"
#include "core/sparse/index_sets.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

CudaBackendOptions Invariant(bool on) {
  CudaBackendOptions o;
  o.batch_invariant = on;
  return o;
}

// Host copy of rows [begin, begin + n) of a host f32 [rows, cols] tensor.
Tensor Rows(const Tensor& t, int64_t begin, int64_t n) {
  Tensor r = Tensor::HostEmpty(DType::kF32, {n, t.dim(1)});
  std::memcpy(r.data(), t.as<float>() + begin * t.dim(1), r.nbytes());
  return r;
}

// A device tensor's bytes.
std::vector<uint8_t> Bytes(Backend& b, const Tensor& t) {
  Tensor host = Tensor::HostEmpty(t.dtype(), t.shape());
  EXPECT_TRUE(b.ToHost(t, &host).ok());
  const auto* p = static_cast<const uint8_t*>(host.data());
  return std::vector<uint8_t>(p, p + host.nbytes());
}

// Largest |a - b| between two byte images of bf16 or f32 values.
double MaxDiff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, DType dtype) {
  double m = 0;
  if (dtype == DType::kF32) {
    for (size_t i = 0; i + 4 <= a.size(); i += 4) {
      float x, y;
      std::memcpy(&x, &a[i], 4);
      std::memcpy(&y, &b[i], 4);
      m = std::max(m, std::fabs(double(x) - y));
    }
  } else {
    for (size_t i = 0; i + 2 <= a.size(); i += 2) {
      const uint32_t xa = uint32_t(a[i] | (a[i + 1] << 8)) << 16, xb = uint32_t(b[i] | (b[i + 1] << 8)) << 16;
      float x, y;
      std::memcpy(&x, &xa, 4);
      std::memcpy(&y, &xb, 4);
      m = std::max(m, std::fabs(double(x) - y));
    }
  }
  return m;
}

struct LinearCase {
  int64_t k, m;
  DType out;
  bool bias;
};

// Runs Linear over the first M rows of x for each M and compares each row with the one-row result.
// Returns the largest difference seen (0 when every row matched bit for bit).
double LinearRowsVsOneRow(Backend& gpu, const LinearCase& c, std::mt19937& rng, bool check_reference) {
  constexpr int64_t kMaxRows = 128;
  const Tensor x = RandomHost({kMaxRows, c.k}, rng);
  const Tensor w = RandomHost({c.m, c.k}, rng, -0.2f, 0.2f);
  const Tensor bias_h = RandomHost({c.m}, rng);
  auto wd = gpu.ToDevice(w, DType::kBF16, MemoryKind::kWeights);
  auto bd = gpu.ToDevice(bias_h, c.out, MemoryKind::kWeights);
  EXPECT_TRUE(wd.ok() && bd.ok());
  const Tensor* bias = c.bias ? &*bd : nullptr;
  const size_t row_bytes = size_t(c.m) * DTypeSize(c.out);
  std::vector<std::vector<uint8_t>> alone(kMaxRows);
  for (int64_t r = 0; r < kMaxRows; ++r) {
    auto xd = gpu.ToDevice(Rows(x, r, 1), DType::kBF16, MemoryKind::kWorkspace);
    auto out = gpu.Alloc(c.out, {1, c.m}, MemoryKind::kWorkspace);
    EXPECT_TRUE(xd.ok() && out.ok());
    EXPECT_TRUE(gpu.Linear(*xd, *wd, bias, &*out).ok());
    alone[r] = Bytes(gpu, *out);
  }
  double worst = 0;
  for (int64_t rows : {1, 3, 16, 33, 128}) {
    auto xd = gpu.ToDevice(Rows(x, 0, rows), DType::kBF16, MemoryKind::kWorkspace);
    auto out = gpu.Alloc(c.out, {rows, c.m}, MemoryKind::kWorkspace);
    EXPECT_TRUE(xd.ok() && out.ok());
    EXPECT_TRUE(gpu.Linear(*xd, *wd, bias, &*out).ok());
    const std::vector<uint8_t> all = Bytes(gpu, *out);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<uint8_t> row(all.begin() + r * row_bytes, all.begin() + (r + 1) * row_bytes);
      worst = std::max(worst, row == alone[r] ? 0.0 : std::max(MaxDiff(row, alone[r], c.out), 1e-30));
    }
    if (check_reference && rows == kMaxRows) {
      Tensor ref = Tensor::HostEmpty(DType::kF32, {rows, c.m});
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < c.m; ++j) {
          double s = c.bias ? bias_h.as<float>()[j] : 0.0;
          for (int64_t e = 0; e < c.k; ++e) s += double(x.as<float>()[i * c.k + e]) * w.as<float>()[j * c.k + e];
          ref.as<float>()[i * c.m + j] = static_cast<float>(s);
        }
      }
      const double tol = c.out == DType::kBF16 ? 1e-2 : 2e-4;
      ExpectClose(DeviceToF32(gpu, *out), ref, {tol, tol, tol},
                  absl::StrCat("linear k ", c.k, " m ", c.m, " vs reference"));
    }
  }
  return worst;
}

const LinearCase kLinearCases[] = {
    {576, 1536, DType::kBF16, false},  // SmolLM2-135M's gate/up shape
    {1536, 576, DType::kBF16, true},
    {97, 203, DType::kBF16, true},  // k not a multiple of 8: element loads
    {576, 2049, DType::kF32, false},  // an lm_head-like f32 output of odd width
};

TEST(CudaBatchInvariant, LinearRowsEqualTheirOneRowResultForEveryRowCount) {
  SPC_GPU_OR_SKIP(gpu, Invariant(true));
  ASSERT_TRUE(gpu->batch_invariant());
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (const LinearCase& c : kLinearCases) {
    EXPECT_EQ(LinearRowsVsOneRow(*gpu, c, rng, true), 0.0)
        << "k " << c.k << " m " << c.m << " seed " << seed << ": a row differs from its one-row result";
  }
}

TEST(CudaBatchInvariant, LinearBatchDependenceWithTheModeOffIsOnlyReported) {
  SPC_GPU_OR_SKIP(gpu, Invariant(false));
  std::mt19937 rng(FreshSeed());
  for (const LinearCase& c : kLinearCases) {
    std::printf("[ info ] mode off: linear k %lld m %lld: max |row among M - row alone| = %g\n",
                static_cast<long long>(c.k), static_cast<long long>(c.m), LinearRowsVsOneRow(*gpu, c, rng, false));
  }
}

// The two tiles of the kernel give the same bits at the same row count (a row's chain of steps does not
// depend on the tile), including at a row count the auto choice would give to the other tile.
TEST(CudaBatchInvariant, GemmTilesAgree) {
  SPC_GPU_OR_SKIP(gpu, Invariant(true));
  auto stream = CudaComputeStream(*gpu);
  ASSERT_TRUE(stream.ok());
  std::mt19937 rng(FreshSeed());
  for (int64_t n : {1, 5, 16, 40}) {
    const int64_t k = 328, m = 173;
    auto x = gpu->ToDevice(RandomHost({n, k}, rng), DType::kBF16, MemoryKind::kWorkspace);
    auto w = gpu->ToDevice(RandomHost({m, k}, rng), DType::kBF16, MemoryKind::kWeights);
    auto o16 = gpu->Alloc(DType::kF32, {n, m}, MemoryKind::kWorkspace);
    auto o64 = gpu->Alloc(DType::kF32, {n, m}, MemoryKind::kWorkspace);
    ASSERT_TRUE(x.ok() && w.ok() && o16.ok() && o64.ok());
    cuda::GemmInvariantParams p;
    p.x = x->data();
    p.w = w->data();
    p.n = static_cast<int>(n);
    p.m = static_cast<int>(m);
    p.k = static_cast<int>(k);
    p.out_type = cuda::ElemType::kF32;
    p.out = o16->data();
    p.tile_rows = 16;
    ASSERT_EQ(cuda::LaunchGemmInvariant(p, static_cast<cudaStream_t>(*stream)), cudaSuccess);
    p.out = o64->data();
    p.tile_rows = 64;
    ASSERT_EQ(cuda::LaunchGemmInvariant(p, static_cast<cudaStream_t>(*stream)), cudaSuccess);
    EXPECT_EQ(Bytes(*gpu, *o16), Bytes(*gpu, *o64)) << "n " << n << ": the 16- and 64-row tiles differ";
  }
}

// ---- decode attention ----

struct AttnShape {
  int n_kv, group, hd;
};

// One sequence's cache (device) and its host copy, [n_kv, cap, hd] each for K and V.
struct Seq {
  SequenceKv kv;
  Tensor k_host, v_host;
  int past = 0;
};

class AttnFixture {
 public:
  AttnFixture(Backend& gpu, const AttnShape& s, std::mt19937& rng) : gpu_(gpu), s_(s), rng_(rng) {}

  Seq* Add(int past, int cap) {
    auto seq = std::make_unique<Seq>();
    seq->past = past;
    seq->k_host = RandomHost({s_.n_kv, cap, s_.hd}, rng_);
    seq->v_host = RandomHost({s_.n_kv, cap, s_.hd}, rng_);
    seq->kv.capacity = cap;
    seq->kv.k.push_back(*gpu_.ToDevice(seq->k_host, DType::kBF16, MemoryKind::kKvCache));
    seq->kv.v.push_back(*gpu_.ToDevice(seq->v_host, DType::kBF16, MemoryKind::kKvCache));
    seqs_.push_back(std::move(seq));
    return seqs_.back().get();
  }

  // Runs one step (append + attention of layer 0) over `batch` with `n_tokens[i]` new tokens each. The rows
  // of `target` (one new token) come from target_q/k/v, the others are fresh random rows. Returns the bytes
  // of the target's output row, checks every output row against the reference.
  std::vector<uint8_t> Step(const std::vector<Seq*>& batch, const std::vector<int>& n_tokens, Seq* target,
                            const Tensor& target_q, const Tensor& target_k, const Tensor& target_v,
                            const std::string& what) {
    const int n_heads = s_.n_kv * s_.group, hd = s_.hd;
    int n = 0;
    for (int t : n_tokens) n += t;
    Tensor q = RandomHost({n, n_heads, hd}, rng_), k = RandomHost({n, s_.n_kv, hd}, rng_);
    Tensor v = RandomHost({n, s_.n_kv, hd}, rng_);
    BatchDesc b;
    int row = 0, target_row = -1;
    for (size_t i = 0; i < batch.size(); ++i) {
      b.seqs.push_back({row, n_tokens[i], batch[i]->past});
      b.kv.push_back(&batch[i]->kv);
      if (batch[i] == target) {
        target_row = row;
        std::memcpy(q.as<float>() + size_t(row) * n_heads * hd, target_q.data(), target_q.nbytes());
        std::memcpy(k.as<float>() + size_t(row) * s_.n_kv * hd, target_k.data(), target_k.nbytes());
        std::memcpy(v.as<float>() + size_t(row) * s_.n_kv * hd, target_v.data(), target_v.nbytes());
      }
      row += n_tokens[i];
    }
    b.n_tokens = n;
    auto qd = gpu_.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
    auto kd = gpu_.ToDevice(k, DType::kBF16, MemoryKind::kWorkspace);
    auto vd = gpu_.ToDevice(v, DType::kBF16, MemoryKind::kWorkspace);
    auto out = gpu_.Alloc(DType::kBF16, {n, n_heads, hd}, MemoryKind::kWorkspace);
    EXPECT_TRUE(qd.ok() && kd.ok() && vd.ok() && out.ok()) << what;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    EXPECT_TRUE(gpu_.PrepareBatch(b).ok()) << what;
    EXPECT_TRUE(gpu_.KvAppend(0, *kd, *vd).ok()) << what;
    EXPECT_TRUE(gpu_.Attention(0, *qd, scale, &*out).ok()) << what;
    // The host caches take the appended rows; then the reference of every row.
    for (size_t i = 0; i < batch.size(); ++i) {
      for (int t = 0; t < n_tokens[i]; ++t) {
        for (int g = 0; g < s_.n_kv; ++g) {
          const size_t dst = (size_t(g) * batch[i]->kv.capacity + batch[i]->past + t) * hd;
          const size_t src = (size_t(b.seqs[i].token_begin + t) * s_.n_kv + g) * hd;
          std::memcpy(batch[i]->k_host.as<float>() + dst, k.as<float>() + src, hd * sizeof(float));
          std::memcpy(batch[i]->v_host.as<float>() + dst, v.as<float>() + src, hd * sizeof(float));
        }
      }
    }
    Tensor ref = Tensor::HostEmpty(DType::kF32, {n, n_heads, hd});
    for (size_t i = 0; i < batch.size(); ++i) {
      const Seq& s = *batch[i];
      for (int t = 0; t < n_tokens[i]; ++t) {
        const int r = b.seqs[i].token_begin + t, len = s.past + t + 1;
        for (int h = 0; h < n_heads; ++h) {
          const int g = h / s_.group;
          const float* qr = q.as<float>() + (size_t(r) * n_heads + h) * hd;
          std::vector<double> w(len);
          double mx = -INFINITY, sum = 0;
          for (int j = 0; j < len; ++j) {
            const float* kr = s.k_host.as<float>() + (size_t(g) * s.kv.capacity + j) * hd;
            double d = 0;
            for (int e = 0; e < hd; ++e) d += double(qr[e]) * kr[e];
            w[j] = d * scale;
            mx = std::max(mx, w[j]);
          }
          for (double& x : w) sum += (x = std::exp(x - mx));
          for (int e = 0; e < hd; ++e) {
            double o = 0;
            for (int j = 0; j < len; ++j) o += w[j] * s.v_host.as<float>()[(size_t(g) * s.kv.capacity + j) * hd + e];
            ref.as<float>()[(size_t(r) * n_heads + h) * hd + e] = static_cast<float>(o / sum);
          }
        }
      }
    }
    ExpectClose(DeviceToF32(gpu_, *out), ref, {1e-2, 2e-2, 1e-2}, what + " vs reference");
    const std::vector<uint8_t> all = Bytes(gpu_, *out);
    const size_t row_bytes = size_t(n_heads) * hd * 2;
    return std::vector<uint8_t>(all.begin() + target_row * row_bytes, all.begin() + (target_row + 1) * row_bytes);
  }

 private:
  Backend& gpu_;
  AttnShape s_;
  std::mt19937& rng_;
  std::vector<std::unique_ptr<Seq>> seqs_;
};

// The target (past 1,531 keys: several splits) decodes alone, among 31 others (lengths 1..3,000), and in a
// mixed batch with a 45-token prefill chunk and 5 other decoders. Its appended row is the same each time, so
// its cache is the same; returns the largest difference of its output row from the alone run.
double DecodeAttentionAloneVsBatched(Backend& gpu, const AttnShape& s, std::mt19937& rng) {
  AttnFixture f(gpu, s, rng);
  const int n_heads = s.n_kv * s.group;
  Seq* target = f.Add(1531, 1600);
  const Tensor tq = RandomHost({1, n_heads, s.hd}, rng);
  const Tensor tk = RandomHost({1, s.n_kv, s.hd}, rng), tv = RandomHost({1, s.n_kv, s.hd}, rng);
  std::uniform_int_distribution<int> len(0, 3000);
  std::vector<Seq*> others;
  for (int i = 0; i < 31; ++i) {
    const int past = len(rng);
    others.push_back(f.Add(past, past + 64));
  }
  const std::string what = absl::StrCat("n_kv ", s.n_kv, " group ", s.group, " hd ", s.hd);
  const std::vector<uint8_t> alone = f.Step({target}, {1}, target, tq, tk, tv, what + " alone");
  std::vector<Seq*> batch(others.begin(), others.end());
  batch.insert(batch.begin() + 13, target);
  const std::vector<uint8_t> in32 = f.Step(batch, std::vector<int>(32, 1), target, tq, tk, tv, what + " among 32");
  Seq* prefill = f.Add(70, 200);
  const std::vector<Seq*> mixed = {others[0], others[1], prefill, target, others[2], others[3], others[4]};
  const std::vector<uint8_t> in_mixed = f.Step(mixed, {1, 1, 45, 1, 1, 1, 1}, target, tq, tk, tv, what + " mixed");
  return std::max(MaxDiff(alone, in32, DType::kBF16), MaxDiff(alone, in_mixed, DType::kBF16)) +
         (alone == in32 && alone == in_mixed ? 0.0 : 1e-30);
}

const AttnShape kAttnShapes[] = {{3, 3, 64}, {8, 4, 128}, {2, 1, 64}};

TEST(CudaBatchInvariant, DecodeAttentionOfASequenceIsTheSameAloneAmong32AndBesideAPrefill) {
  SPC_GPU_OR_SKIP(gpu, Invariant(true));
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (const AttnShape& s : kAttnShapes) {
    EXPECT_EQ(DecodeAttentionAloneVsBatched(*gpu, s, rng), 0.0)
        << "n_kv " << s.n_kv << " group " << s.group << " hd " << s.hd << " seed " << seed;
  }
}

TEST(CudaBatchInvariant, DecodeAttentionBatchDependenceWithTheModeOffIsOnlyReported) {
  SPC_GPU_OR_SKIP(gpu, Invariant(false));
  std::mt19937 rng(FreshSeed());
  for (const AttnShape& s : kAttnShapes) {
    std::printf("[ info ] mode off: decode attention n_kv %d group %d hd %d: max |batched - alone| = %g\n", s.n_kv,
                s.group, s.hd, DecodeAttentionAloneVsBatched(*gpu, s, rng));
  }
}

// ---- sparse attention (resident layer: sets address the full caches) ----

struct SparseSeq {
  SequenceKv kv;
  int past = 0;
  std::vector<std::vector<int32_t>> sets;  // [n_kv] ascending positions < past
};

std::unique_ptr<SparseSeq> MakeSparseSeq(Backend& gpu, const AttnShape& s, int past, int set_size, std::mt19937& rng) {
  auto q = std::make_unique<SparseSeq>();
  q->past = past;
  q->kv.capacity = past + 1;
  q->kv.k.push_back(*gpu.ToDevice(RandomHost({s.n_kv, past + 1, s.hd}, rng), DType::kBF16, MemoryKind::kKvCache));
  q->kv.v.push_back(*gpu.ToDevice(RandomHost({s.n_kv, past + 1, s.hd}, rng), DType::kBF16, MemoryKind::kKvCache));
  std::vector<int32_t> all(past);
  std::iota(all.begin(), all.end(), 0);
  for (int g = 0; g < s.n_kv; ++g) {
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> set(all.begin(), all.begin() + std::min(past, set_size));
    std::sort(set.begin(), set.end());
    q->sets.push_back(std::move(set));
  }
  return q;
}

// One SparseAttention of layer 0 over `batch`; the target's q, k_cur and v_cur rows are the given ones.
// Returns the bytes of the target's output row.
std::vector<uint8_t> SparseStep(Backend& gpu, const AttnShape& s, const std::vector<SparseSeq*>& batch,
                                SparseSeq* target, const Tensor& tq, const Tensor& tk, const Tensor& tv,
                                std::mt19937& rng, const std::string& what) {
  const int n = static_cast<int>(batch.size()), n_heads = s.n_kv * s.group, hd = s.hd;
  IndexSets sets;
  sets.n_seqs = n;
  sets.n_kv_heads = s.n_kv;
  sets.sets_per_seq = s.n_kv;
  sets.indptr.push_back(0);
  BatchDesc b;
  int target_row = -1;
  for (int i = 0; i < n; ++i) {
    sets.seq_len.push_back(batch[i]->past);
    for (const auto& set : batch[i]->sets) {
      sets.indices.insert(sets.indices.end(), set.begin(), set.end());
      sets.indptr.push_back(static_cast<int32_t>(sets.indices.size()));
      sets.budget = std::max(sets.budget, static_cast<int32_t>(set.size()));
    }
    b.seqs.push_back({i, 1, batch[i]->past});
    b.kv.push_back(&batch[i]->kv);
    if (batch[i] == target) target_row = i;
  }
  b.n_tokens = n;
  Tensor q = RandomHost({n, n_heads, hd}, rng), k = RandomHost({n, s.n_kv, hd}, rng), v = RandomHost({n, s.n_kv, hd}, rng);
  std::memcpy(q.as<float>() + size_t(target_row) * n_heads * hd, tq.data(), tq.nbytes());
  std::memcpy(k.as<float>() + size_t(target_row) * s.n_kv * hd, tk.data(), tk.nbytes());
  std::memcpy(v.as<float>() + size_t(target_row) * s.n_kv * hd, tv.data(), tv.nbytes());
  auto qd = gpu.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
  auto kd = gpu.ToDevice(k, DType::kBF16, MemoryKind::kWorkspace);
  auto vd = gpu.ToDevice(v, DType::kBF16, MemoryKind::kWorkspace);
  auto out = gpu.Alloc(DType::kBF16, {n, n_heads, hd}, MemoryKind::kWorkspace);
  EXPECT_TRUE(qd.ok() && kd.ok() && vd.ok() && out.ok()) << what;
  absl::Status st = gpu.PrepareBatch(b);
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  st = gpu.PrepareSparseDecode(SparseDecodeDesc{&sets, {}});
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  st = gpu.SparseAttention(0, *qd, *kd, *vd, 1.0f / std::sqrt(static_cast<float>(hd)), &*out);
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  const std::vector<uint8_t> all = Bytes(gpu, *out);
  const size_t row_bytes = size_t(n_heads) * hd * 2;
  return std::vector<uint8_t>(all.begin() + target_row * row_bytes, all.begin() + (target_row + 1) * row_bytes);
}

// The target (past 2,500, sets of 700 positions) alone, then among 31 sequences of 1..4,000 past tokens and
// sets of up to 2,000 positions (the default plan's chunk follows the batch's key count and longest list).
double SparseAloneVsBatched(Backend& gpu, const AttnShape& s, std::mt19937& rng) {
  const int n_heads = s.n_kv * s.group;
  std::unique_ptr<SparseSeq> target = MakeSparseSeq(gpu, s, 2500, 700, rng);
  const Tensor tq = RandomHost({1, n_heads, s.hd}, rng);
  const Tensor tk = RandomHost({1, s.n_kv, s.hd}, rng), tv = RandomHost({1, s.n_kv, s.hd}, rng);
  std::vector<std::unique_ptr<SparseSeq>> others;
  std::uniform_int_distribution<int> past(1, 4000), size(1, 2000);
  for (int i = 0; i < 31; ++i) others.push_back(MakeSparseSeq(gpu, s, past(rng), size(rng), rng));
  const std::string what = absl::StrCat("sparse n_kv ", s.n_kv, " group ", s.group, " hd ", s.hd);
  const std::vector<uint8_t> alone = SparseStep(gpu, s, {target.get()}, target.get(), tq, tk, tv, rng, what + " alone");
  std::vector<SparseSeq*> batch;
  for (auto& o : others) batch.push_back(o.get());
  batch.insert(batch.begin() + 9, target.get());
  const std::vector<uint8_t> in32 = SparseStep(gpu, s, batch, target.get(), tq, tk, tv, rng, what + " among 32");
  return alone == in32 ? 0.0 : std::max(MaxDiff(alone, in32, DType::kBF16), 1e-30);
}

// Head dims 64/128 with group <= 8 take the tensor-core sparse kernel; head_dim 80 the generic one.
const AttnShape kSparseShapes[] = {{3, 3, 64}, {8, 4, 128}, {2, 5, 80}};

TEST(CudaBatchInvariant, SparseAttentionOfASequenceIsTheSameAloneAndAmong32) {
  SPC_GPU_OR_SKIP(gpu, Invariant(true));
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (const AttnShape& s : kSparseShapes) {
    EXPECT_EQ(SparseAloneVsBatched(*gpu, s, rng), 0.0)
        << "n_kv " << s.n_kv << " group " << s.group << " hd " << s.hd << " seed " << seed;
  }
}

TEST(CudaBatchInvariant, SparseAttentionBatchDependenceWithTheModeOffIsOnlyReported) {
  SPC_GPU_OR_SKIP(gpu, Invariant(false));
  std::mt19937 rng(FreshSeed());
  for (const AttnShape& s : kSparseShapes) {
    std::printf("[ info ] mode off: sparse attention n_kv %d group %d hd %d: max |among 32 - alone| = %g\n", s.n_kv,
                s.group, s.hd, SparseAloneVsBatched(*gpu, s, rng));
  }
}

TEST(CudaBatchInvariant, TheModeCanBeSwitchedAndReportsItself) {
  SPC_GPU_OR_SKIP(gpu);
  EXPECT_FALSE(gpu->batch_invariant());
  ASSERT_TRUE(gpu->set_batch_invariant(true).ok());
  EXPECT_TRUE(gpu->batch_invariant());
  ASSERT_TRUE(gpu->set_batch_invariant(false).ok());
  EXPECT_FALSE(gpu->batch_invariant());
}

}  // namespace
}  // namespace specontext::testing
