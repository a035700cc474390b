// Prefill attention of offloaded layers over a device copy (core/cuda/cuda_prefill_staging.cc).
//
// The staged path runs the same kernel over the same work items on a bitwise copy of the same K/V rows, so
// its output must equal, bit for bit, the attention of the same batch with every layer resident on the device
// (and the direct path over mapped host memory). Checked at the backend level (several chunks, GQA 1 and 4,
// head_dim 64 and 128, odd lengths, 3 sequences with different pasts, a decode token inside a prefill batch,
// limits giving one round, several rounds, sequences left direct, staging off) and through the Transformer
// (chunked prefill of a batch of 3 with 3 of 4 layers offloaded vs all resident: identical logits). The
// backend's counters show the staging path was taken (bytes copied = exactly the rows of the staged
// sequences) and that decode-only steps never stage. Also: a tight device limit (the exact-size fallback of the
// staging block) and the time of one Llama-3.1-8B-shaped layer, direct vs staged (printed).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/model/transformer.h"
#include "core/status_macros.h"
#include "tests/cuda/cuda_test_util.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext::testing {
namespace {

using Stats = cuda::CudaBackend::PrefillStagingStats;

// Moves `layer` of `kv` to the host tier as SequenceKv (core/backend.h) describes it: k/v alias pinned host
// copies (the old device rows are copied over), slot buffers of `budget` rows exist.
absl::Status Offload(Backend& b, SequenceKv* kv, int layer, int budget) {
  const size_t n_layers = kv->k.size();
  kv->host_k.resize(n_layers);
  kv->host_v.resize(n_layers);
  kv->slot_k.resize(n_layers);
  kv->slot_v.resize(n_layers);
  kv->slot_budget = budget;
  const Shape shape = kv->k[layer].shape();
  ASSIGN_OR_RETURN(Tensor hk, b.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache));
  ASSIGN_OR_RETURN(Tensor hv, b.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache));
  RETURN_IF_ERROR(b.CopyToPinnedHost(kv->k[layer], &hk));
  RETURN_IF_ERROR(b.CopyToPinnedHost(kv->v[layer], &hv));
  ASSIGN_OR_RETURN(kv->slot_k[layer], b.Alloc(DType::kBF16, {shape[0], budget, shape[2]}, MemoryKind::kPrefetch));
  ASSIGN_OR_RETURN(kv->slot_v[layer], b.Alloc(DType::kBF16, {shape[0], budget, shape[2]}, MemoryKind::kPrefetch));
  kv->host_k[layer] = kv->k[layer] = hk;
  kv->host_v[layer] = kv->v[layer] = hv;
  return absl::OkStatus();
}

std::vector<uint16_t> Bits(Backend& b, const Tensor& t) {
  Tensor host = Tensor::HostEmpty(DType::kBF16, t.shape());
  EXPECT_TRUE(b.ToHost(t, &host).ok());
  return std::vector<uint16_t>(host.as<uint16_t>(), host.as<uint16_t>() + host.numel());
}

int64_t StagedBytesOf(int64_t rows, int n_kv, int hd) {
  const int64_t half = (int64_t{n_kv} * rows * hd * 2 + 255) / 256 * 256;
  return 2 * half;
}

struct Case {
  int n_kv, group, hd;
};

// One run of `steps` (per step, new tokens of each of 3 sequences) through a resident and a tiered set of
// caches (layer 0 resident, layers 1 and 2 offloaded) with the staging limit `limit`; outputs must agree
// bit for bit. Checks the counters against the bytes the staged sequences must have moved.
void RunCase(Backend& gpu, const Case& c, int64_t limit, const std::vector<std::vector<int>>& steps,
             std::mt19937& rng, bool expect_rounds, bool expect_direct) {
  auto& cb = static_cast<cuda::CudaBackend&>(gpu);
  cb.set_prefill_staging_limit(limit);
  const int n_layers = 3, n_seqs = 3, n_heads = c.n_kv * c.group;
  const std::string what = absl::StrCat("n_kv ", c.n_kv, " group ", c.group, " hd ", c.hd, " limit ", limit);
  int total = 0;
  for (const auto& s : steps) total = std::max(total, *std::max_element(s.begin(), s.end()));
  const int cap = static_cast<int>(steps.size()) * total + 3;
  std::vector<SequenceKv> res(n_seqs), tier(n_seqs);
  for (int i = 0; i < n_seqs; ++i) {
    for (SequenceKv* kv : {&res[i], &tier[i]}) {
      kv->capacity = cap;
      for (int l = 0; l < n_layers; ++l) {
        kv->k.push_back(*gpu.Alloc(DType::kBF16, {c.n_kv, cap, c.hd}, MemoryKind::kKvCache));
        kv->v.push_back(*gpu.Alloc(DType::kBF16, {c.n_kv, cap, c.hd}, MemoryKind::kKvCache));
      }
    }
    for (int l = 1; l < n_layers; ++l) ASSERT_TRUE(Offload(gpu, &tier[i], l, 8).ok()) << what;
  }
  std::vector<int> past(n_seqs, 0);
  for (size_t step = 0; step < steps.size(); ++step) {
    BatchDesc rb, tb;
    int n = 0;
    bool decode_only = true;
    int64_t want_bytes = 0;
    int staged_seqs = 0, direct_seqs = 0;
    for (int i = 0; i < n_seqs; ++i) {
      const int t = steps[step][i];
      rb.seqs.push_back({n, t, past[i]});
      rb.kv.push_back(&res[i]);
      tb.kv.push_back(&tier[i]);
      n += t;
      decode_only = decode_only && t == 1;
      if (t > 1) {  // prefill tiles (group <= 16: a single token is a decode tile, never staged)
        const int64_t need = StagedBytesOf(past[i] + t, c.n_kv, c.hd);
        if (need <= limit) {
          ++staged_seqs;
          want_bytes += 2 * int64_t{c.n_kv} * (past[i] + t) * c.hd * 2 * (n_layers - 1);
        } else if (limit > 0) {
          ++direct_seqs;
        }
      }
    }
    rb.n_tokens = n;
    tb.seqs = rb.seqs;
    tb.n_tokens = n;
    const std::string at = absl::StrCat(what, " step ", step);
    const Stats before = cb.prefill_staging_stats();
    std::vector<Tensor> q, k, v, out_r, out_t;
    for (int l = 0; l < n_layers; ++l) {
      q.push_back(*gpu.ToDevice(RandomHost({n, n_heads, c.hd}, rng), DType::kBF16, MemoryKind::kWorkspace));
      k.push_back(*gpu.ToDevice(RandomHost({n, c.n_kv, c.hd}, rng), DType::kBF16, MemoryKind::kWorkspace));
      v.push_back(*gpu.ToDevice(RandomHost({n, c.n_kv, c.hd}, rng), DType::kBF16, MemoryKind::kWorkspace));
      out_r.push_back(*gpu.Alloc(DType::kBF16, {n, n_heads, c.hd}, MemoryKind::kWorkspace));
      out_t.push_back(*gpu.Alloc(DType::kBF16, {n, n_heads, c.hd}, MemoryKind::kWorkspace));
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    // As the model runs a step: one PrepareBatch, then append + attention layer by layer (one staging plan
    // serves every offloaded layer of the step).
    ASSERT_TRUE(gpu.PrepareBatch(rb).ok()) << at;
    for (int l = 0; l < n_layers; ++l) {
      ASSERT_TRUE(gpu.KvAppend(l, k[l], v[l]).ok()) << at;
      ASSERT_TRUE(gpu.Attention(l, q[l], scale, &out_r[l]).ok()) << at;
    }
    ASSERT_TRUE(gpu.PrepareBatch(tb).ok()) << at;
    for (int l = 0; l < n_layers; ++l) {
      absl::Status st = tier[0].offloaded(l) ? gpu.KvAppendHost(l, k[l], v[l]) : gpu.KvAppend(l, k[l], v[l]);
      ASSERT_TRUE(st.ok()) << at << ": " << st;
      st = gpu.Attention(l, q[l], scale, &out_t[l]);
      ASSERT_TRUE(st.ok()) << at << ": " << st;
    }
    for (int l = 0; l < n_layers; ++l) {
      const std::vector<uint16_t> r = Bits(gpu, out_r[l]), t = Bits(gpu, out_t[l]);
      size_t diff = 0;
      while (diff < r.size() && r[diff] == t[diff]) ++diff;
      EXPECT_EQ(diff, r.size()) << at << " layer " << l << ": first difference at element " << diff;
    }
    const Stats after = cb.prefill_staging_stats();
    EXPECT_EQ(after.staged_bytes - before.staged_bytes, want_bytes) << at;
    EXPECT_EQ(after.staged_layers - before.staged_layers, staged_seqs > 0 ? n_layers - 1 : 0) << at;
    EXPECT_EQ(after.staged_copies - before.staged_copies, int64_t{staged_seqs} * (n_layers - 1)) << at;
    EXPECT_EQ(after.direct_seqs - before.direct_seqs, direct_seqs) << at;  // one plan per batch
    if (decode_only) {
      EXPECT_EQ(after.staged_layers, before.staged_layers) << at << ": a decode-only step staged";
    }
    for (int i = 0; i < n_seqs; ++i) past[i] += steps[step][i];
  }
  ASSERT_TRUE(gpu.Synchronize().ok());
  if (expect_rounds) {
    EXPECT_GE(cb.prefill_staging_stats().max_rounds, 2) << what;
  }
  if (expect_direct) {
    EXPECT_GT(cb.prefill_staging_stats().direct_seqs, 0) << what;
  }
}

TEST(CudaPrefillStaging, StagedAttentionIsBitwiseTheResidentOne) {
  SPC_GPU_OR_SKIP(gpu);
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  // Odd lengths, different pasts, a decode token inside prefill batches, a decode-only step at the end.
  const std::vector<std::vector<int>> steps = {{37, 5, 19}, {13, 1, 29}, {7, 23, 3}, {1, 1, 1}, {65, 2, 1}};
  for (const Case& c : {Case{2, 1, 128}, Case{2, 4, 128}, Case{1, 4, 64}, Case{3, 1, 64}}) {
    int64_t max_need = 0, min_need = INT64_MAX;
    std::vector<int> past(3, 0);
    for (const auto& s : steps) {
      for (int i = 0; i < 3; ++i) {
        if (s[i] > 1) {
          max_need = std::max(max_need, StagedBytesOf(past[i] + s[i], c.n_kv, c.hd));
          min_need = std::min(min_need, StagedBytesOf(past[i] + s[i], c.n_kv, c.hd));
        }
        past[i] += s[i];
      }
    }
    RunCase(*gpu, c, cuda::CudaBackend::kDefaultPrefillStagingBytes, steps, rng, false, false);
    // Each sequence fits alone, not all together: several rounds through one buffer.
    RunCase(*gpu, c, max_need, steps, rng, true, false);
    // The longer sequences do not fit at all: they keep the direct path, the others are staged.
    RunCase(*gpu, c, (min_need + max_need) / 2, steps, rng, false, true);
    // Staging off: the direct path over mapped host memory.
    RunCase(*gpu, c, 0, steps, rng, false, false);
  }
}

// Under a 64 MiB device limit (32 MiB of it cuBLAS workspace) the usual 64 MiB staging block cannot be had: the
// backend asks for the exact size instead and still stages everything.
TEST(CudaPrefillStaging, TightDeviceLimitStagesWithAnExactBlock) {
  CudaBackendOptions o;
  o.memory_limit = int64_t{64} << 20;
  SPC_GPU_OR_SKIP(gpu, o);
  std::mt19937 rng(FreshSeed());
  RunCase(*gpu, Case{2, 4, 128}, cuda::CudaBackend::kDefaultPrefillStagingBytes, {{37, 5, 19}, {13, 1, 29}}, rng,
          false, false);
  EXPECT_EQ(static_cast<cuda::CudaBackend&>(*gpu).prefill_staging_stats().direct_seqs, 0);
}

// One offloaded layer of the Llama-3.1-8B shape (8 KV heads, group 4, head_dim 128): a 512-token chunk over a
// 32K past, direct (tiles read mapped host memory) vs staged. Prints both; the staged path must be faster.
TEST(CudaPrefillStaging, StagingBeatsTheDirectPathAtThe8BShape) {
  SPC_GPU_OR_SKIP(gpu);
  auto& cb = static_cast<cuda::CudaBackend&>(*gpu);
  const int n_kv = 8, group = 4, hd = 128, past = 32768, n = 512, cap = past + n;
  SequenceKv kv;
  kv.capacity = cap;
  kv.k.push_back(*gpu->Alloc(DType::kBF16, {n_kv, cap, hd}, MemoryKind::kKvCache));
  kv.v.push_back(*gpu->Alloc(DType::kBF16, {n_kv, cap, hd}, MemoryKind::kKvCache));
  ASSERT_TRUE(Offload(*gpu, &kv, 0, 16).ok());
  std::mt19937 rng(FreshSeed());
  for (Tensor* t : {&kv.host_k[0], &kv.host_v[0]}) {
    uint16_t* p = t->as<uint16_t>();
    // Random bf16 in (-2, 2): sign, exponent 126..127, random mantissa.
    for (int64_t e = 0; e < t->numel(); ++e) {
      const uint32_t r = rng();
      p[e] = static_cast<uint16_t>((r & 0x8000u) | ((126u + ((r >> 7) & 1u)) << 7) | (r & 0x7fu));
    }
  }
  BatchDesc b;
  b.seqs.push_back({0, n, past});
  b.kv.push_back(&kv);
  b.n_tokens = n;
  Tensor q = *gpu->ToDevice(RandomHost({n, n_kv * group, hd}, rng), DType::kBF16, MemoryKind::kWorkspace);
  Tensor k = *gpu->ToDevice(RandomHost({n, n_kv, hd}, rng), DType::kBF16, MemoryKind::kWorkspace);
  Tensor v = *gpu->ToDevice(RandomHost({n, n_kv, hd}, rng), DType::kBF16, MemoryKind::kWorkspace);
  Tensor out_d = *gpu->Alloc(DType::kBF16, {n, n_kv * group, hd}, MemoryKind::kWorkspace);
  Tensor out_s = *gpu->Alloc(DType::kBF16, {n, n_kv * group, hd}, MemoryKind::kWorkspace);
  auto time_ms = [&](int64_t limit, Tensor* out) {
    cb.set_prefill_staging_limit(limit);
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      EXPECT_TRUE(gpu->PrepareBatch(b).ok());
      EXPECT_TRUE(gpu->KvAppendHost(0, k, v).ok());
      EXPECT_TRUE(gpu->Synchronize().ok());
      const auto t0 = std::chrono::steady_clock::now();
      EXPECT_TRUE(gpu->Attention(0, q, 1.0f / std::sqrt(float(hd)), out).ok());
      EXPECT_TRUE(gpu->Synchronize().ok());
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  const double direct = time_ms(0, &out_d);
  const Stats before = cb.prefill_staging_stats();
  const double staged = time_ms(cuda::CudaBackend::kDefaultPrefillStagingBytes, &out_s);
  EXPECT_EQ(cb.prefill_staging_stats().staged_layers - before.staged_layers, 3);
  EXPECT_TRUE(Bits(*gpu, out_d) == Bits(*gpu, out_s)) << "staged and direct outputs differ";
  const double mb = 2.0 * n_kv * cap * hd * 2 / 1e6;
  std::printf("8B-shape layer, chunk %d over past %d: direct %.2f ms, staged %.2f ms (%.0f MB copied, %.1f GB/s)\n", n,
              past, direct, staged, mb, mb / staged);
  EXPECT_LT(staged, direct);
}

// A tiny random Llama (4 layers, head_dim 64) on the GPU: chunked prefill of 3 sequences with layers 1..3
// offloaded gives exactly the logits of the same sequences with every layer resident.
void RunModel(int n_kv, int group) {
  SPC_GPU_OR_SKIP(gpu);
  auto& cb = static_cast<cuda::CudaBackend&>(*gpu);
  auto preset = RandomCheckpointPreset("tiny-llama");
  ASSERT_TRUE(preset.ok()) << preset.status();
  ModelConfig cfg = *preset;
  cfg.num_hidden_layers = 4;
  cfg.num_key_value_heads = n_kv;
  cfg.num_attention_heads = n_kv * group;
  cfg.head_dim = 64;
  const std::string dir = (std::filesystem::temp_directory_path() /
                           absl::StrCat("spc_prefill_staging_", getpid(), "_", n_kv, "_", group))
                              .string();
  RandomCheckpointOptions o;
  o.dtype = DType::kF32;
  o.seed = FreshSeed();
  o.num_threads = 2;
  ASSERT_TRUE(WriteRandomCheckpoint(cfg, dir, o).ok());
  auto ck = OpenCheckpoint(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto model = Transformer::Load(*ck, gpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  const int cap = 160, n_seqs = 3;
  std::vector<std::unique_ptr<SequenceKv>> res, tier;
  for (int i = 0; i < n_seqs; ++i) {
    res.push_back(*(*model)->AllocateKv(cap));
    tier.push_back(*(*model)->AllocateKv(cap));
    for (int l = 1; l < 4; ++l) ASSERT_TRUE(Offload(*gpu, tier.back().get(), l, 16).ok());
  }
  std::mt19937 rng(o.seed);
  std::uniform_int_distribution<int32_t> tok(3, static_cast<int32_t>(cfg.vocab_size) - 3);
  std::vector<std::vector<int32_t>> prompts(n_seqs, std::vector<int32_t>(cap));
  for (auto& p : prompts) {
    for (int32_t& t : p) t = tok(rng);
  }
  const std::vector<std::vector<int>> steps = {{29, 17, 41}, {31, 1, 12}, {9, 33, 5}, {50, 7, 63}};
  std::vector<int> past(n_seqs, 0);
  for (size_t step = 0; step < steps.size(); ++step) {
    std::vector<ForwardSeq> fr, ft;
    int64_t want_bytes = 0;
    for (int i = 0; i < n_seqs; ++i) {
      std::span<const int32_t> toks(prompts[i].data() + past[i], steps[step][i]);
      fr.push_back({toks, past[i], res[i].get()});
      ft.push_back({toks, past[i], tier[i].get()});
      if (steps[step][i] > 1) want_bytes += 2 * int64_t{n_kv} * (past[i] + steps[step][i]) * 64 * 2 * 3;
    }
    Tensor lr = Tensor::HostEmpty(DType::kF32, {n_seqs, cfg.vocab_size});
    Tensor lt = Tensor::HostEmpty(DType::kF32, {n_seqs, cfg.vocab_size});
    const Stats before = cb.prefill_staging_stats();
    ASSERT_TRUE((*model)->Forward(fr, false, &lr).ok());
    absl::Status st = (*model)->Forward(ft, false, &lt);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    const Stats after = cb.prefill_staging_stats();
    EXPECT_EQ(after.staged_layers - before.staged_layers, 3) << "step " << step;
    EXPECT_EQ(after.staged_bytes - before.staged_bytes, want_bytes) << "step " << step;
    double max_diff = 0;
    for (int64_t e = 0; e < lr.numel(); ++e) {
      max_diff = std::max(max_diff, std::fabs(double(lr.as<float>()[e]) - lt.as<float>()[e]));
    }
    EXPECT_EQ(std::memcmp(lr.data(), lt.data(), lr.nbytes()), 0)
        << "step " << step << ": logits differ from the resident run, max |diff| " << max_diff;
    for (int i = 0; i < n_seqs; ++i) past[i] += steps[step][i];
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TEST(CudaPrefillStaging, ChunkedPrefillOfOffloadedLayersGivesTheResidentLogitsGqa1) { RunModel(2, 1); }
TEST(CudaPrefillStaging, ChunkedPrefillOfOffloadedLayersGivesTheResidentLogitsGqa4) { RunModel(1, 4); }

}  // namespace
}  // namespace specontext::testing
