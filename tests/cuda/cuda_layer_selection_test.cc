// Per-layer selection sources (oracle, quest) and the attention recall probe of the CUDA backend
// against the CPU backend (cpu_layer_selection.cc over the core/sparse references), on fresh random
// bf16-representable inputs at odd sizes: GQA 2/3/5/8, head_dim 64/80/128 (the oracle's tensor-core
// and CUDA-core score kernels), lengths 1 to 4097, odd budgets, sinks spanning pages, head- and
// batch-level sets, an offloaded layer for the probe. Sets must be equal, or differ only at
// near-ties (weights or page scores within rounding of the set's boundary); the lse pairs within
// bf16-input tolerance; the probe's output rows beyond the batch (sentinels) stay untouched. Then
// the SparseDecoder with every source and the probe on the GPU against the CPU decoder on a tiny
// random model.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/model/engine.h"
#include "core/sparse/quest.h"
#include "core/sparse/selection_source.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

struct Case {
  int head_dim, n_kv, group, sink;
  SelectionMode mode;
  std::vector<int> lens, budgets;
};

std::string Name(const Case& c) {
  std::string s =
      absl::StrCat("hd=", c.head_dim, " n_kv=", c.n_kv, " group=", c.group, " sink=", c.sink,
                   c.mode == SelectionMode::kBatchLevel ? " batch" : " head", " lens/budgets=");
  for (size_t i = 0; i < c.lens.size(); ++i) absl::StrAppend(&s, c.lens[i], "/", c.budgets[i], ",");
  return s;
}

// Oracle weights (double) of one set: max over its heads of the softmax over [0, len).
std::vector<double> OracleWeights(const Tensor& q, int seq, const Tensor& k, int len, int set,
                                  int hps, int group) {
  const int64_t n_q = q.dim(1), hd = q.dim(2), cap = k.dim(1);
  std::vector<double> comb(len, 0.0), s(len);
  for (int j = 0; j < hps; ++j) {
    const int h = set * hps + j, g = h / group;
    double mx = -INFINITY, sum = 0;
    for (int t = 0; t < len; ++t) {
      double d = 0;
      for (int64_t e = 0; e < hd; ++e)
        d +=
            double(q.as<float>()[(seq * n_q + h) * hd + e]) * k.as<float>()[(g * cap + t) * hd + e];
      mx = std::max(mx, s[t] = d / std::sqrt(double(hd)));
    }
    for (int t = 0; t < len; ++t) sum += std::exp(s[t] - mx);
    for (int t = 0; t < len; ++t) comb[t] = std::max(comb[t], std::exp(s[t] - mx) / sum);
  }
  return comb;
}

// Quest set scores (double) of every page of one set, pages over rows [0, len] (the current token's
// row too).
std::vector<double> QuestScores(const Tensor& q, int seq, const Tensor& k, int past, int set,
                                int hps, int group) {
  const int64_t n_q = q.dim(1), hd = q.dim(2), cap = k.dim(1);
  const int len = past + 1;
  std::vector<double> comb((len + kQuestPageSize - 1) / kQuestPageSize, -1e300);
  for (int j = 0; j < hps; ++j) {
    const int h = set * hps + j, g = h / group;
    for (size_t p = 0; p < comb.size(); ++p) {
      double u = 0;
      for (int64_t e = 0; e < hd; ++e) {
        double mn = 1e300, mx = -1e300;
        for (int t = int(p) * kQuestPageSize; t < std::min<int>(len, (p + 1) * kQuestPageSize);
             ++t) {
          mn = std::min<double>(mn, k.as<float>()[(g * cap + t) * hd + e]);
          mx = std::max<double>(mx, k.as<float>()[(g * cap + t) * hd + e]);
        }
        const double qe = q.as<float>()[(seq * n_q + h) * hd + e];
        u += std::max(qe * mn, qe * mx);
      }
      comb[p] = std::max(comb[p], u);
    }
  }
  return comb;
}

// Positions (or, for quest, pages) where two sets differ must score within `tol` of each other's
// boundary: the smallest score taken by either set.
void ExpectSameUpToTies(std::vector<int32_t> a, std::vector<int32_t> b,
                        const std::vector<double>& score, int page, double tol,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  if (a == b) return;
  auto unit = [page](int32_t t) { return t / page; };
  double boundary = INFINITY;
  for (int32_t t : a) boundary = std::min(boundary, score[unit(t)]);
  for (int32_t t : b) boundary = std::min(boundary, score[unit(t)]);
  std::vector<int32_t> diff;
  std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(diff));
  for (int32_t t : diff) {
    EXPECT_LE(std::abs(score[unit(t)] - boundary), tol * (1 + std::abs(boundary)))
        << what << " position " << t;
  }
}

void RunCase(Backend& gpu, const Case& c) {
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  const std::string what = absl::StrCat(Name(c), " seed ", seed);
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(&gpu);
  ASSERT_NE(cuda, nullptr);
  std::unique_ptr<Backend> cpu_owner = MakeCpuBackend();
  auto* cpu = static_cast<CpuBackend*>(cpu_owner.get());
  const int n = static_cast<int>(c.lens.size()), n_q = c.n_kv * c.group, hd = c.head_dim;
  // Layer 0 resident, layer 1 offloaded (pinned host, the probe reads its host copy).
  std::vector<SequenceKv> ckv(n), gkv(n);
  std::vector<Tensor> hk(n);  // host f32 K of layer 0 (references)
  BatchDesc cb, gb;
  for (int i = 0; i < n; ++i) {
    const int cap = c.lens[i] + 1 + static_cast<int>(rng() % 5);
    const Shape shape{c.n_kv, cap, hd};
    ckv[i].capacity = gkv[i].capacity = cap;
    for (int l = 0; l < 2; ++l) {
      Tensor k = RandomHost(shape, rng, -2.0f, 2.0f), v = RandomHost(shape, rng);
      if (l == 0) hk[i] = k;
      ckv[i].k.push_back(k);
      ckv[i].v.push_back(v);
      if (l == 0) {
        gkv[i].k.push_back(*gpu.ToDevice(k, DType::kBF16, MemoryKind::kKvCache));
        gkv[i].v.push_back(*gpu.ToDevice(v, DType::kBF16, MemoryKind::kKvCache));
        continue;
      }
      auto pk = gpu.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache);
      auto pv = gpu.AllocPinnedHost(DType::kBF16, shape, MemoryKind::kKvCache);
      ASSERT_TRUE(pk.ok() && pv.ok());
      ConvertFromF32(k.as<float>(), DType::kBF16, pk->data(), k.numel());
      ConvertFromF32(v.as<float>(), DType::kBF16, pv->data(), v.numel());
      gkv[i].host_k = {Tensor(), *pk};
      gkv[i].host_v = {Tensor(), *pv};
      gkv[i].k.push_back(*pk);
      gkv[i].v.push_back(*pv);
    }
    cb.seqs.push_back({i, 1, c.lens[i]});
    gb.seqs.push_back({i, 1, c.lens[i]});
    cb.kv.push_back(&ckv[i]);
    gb.kv.push_back(&gkv[i]);
  }
  cb.n_tokens = gb.n_tokens = n;
  const int sets_per_seq = c.mode == SelectionMode::kBatchLevel ? 1 : c.n_kv;
  const int hps = c.mode == SelectionMode::kBatchLevel ? n_q : c.group;
  IndexSets layout;
  WindowIndexSets(std::vector<int32_t>(c.lens.begin(), c.lens.end()),
                  std::vector<int32_t>(c.budgets.begin(), c.budgets.end()), c.n_kv, sets_per_seq,
                  c.sink, &layout);
  Tensor q = RandomHost({n, n_q, hd}, rng, -2.0f, 2.0f);
  auto gq = gpu.ToDevice(q, DType::kBF16, MemoryKind::kWorkspace);
  ASSERT_TRUE(gq.ok());
  auto prepare = [&]() {
    ASSERT_TRUE(cpu->PrepareBatch(cb).ok());
    ASSERT_TRUE(gpu.PrepareBatch(gb).ok());
    SparseDecodeDesc desc;
    desc.sets = &layout;
    ASSERT_TRUE(cpu->PrepareSparseDecode(desc).ok());
    ASSERT_TRUE(gpu.PrepareSparseDecode(desc).ok());
  };
  for (SelectionSource source : {SelectionSource::kOracle, SelectionSource::kQuest}) {
    prepare();
    LayerSelectionSpec spec;
    spec.source = source;
    spec.sink = c.sink;
    spec.mode = c.mode;
    ASSERT_TRUE(cpu->SelectLayerIndexSets(0, q, spec).ok()) << what;
    absl::Status st = gpu.SelectLayerIndexSets(0, *gq, spec);
    ASSERT_TRUE(st.ok()) << what << ": " << st;
    auto got = cuda->PreparedPositions();
    ASSERT_TRUE(got.ok()) << got.status();
    IndexSets gsets = cpu->prepared_sparse_sets();
    gsets.indices = *got;
    ASSERT_TRUE(ValidateIndexSets(gsets).ok()) << what << ": " << ValidateIndexSets(gsets);
    const IndexSets& csets = cpu->prepared_sparse_sets();
    for (int i = 0; i < n; ++i) {
      for (int s = 0; s < sets_per_seq; ++s) {
        auto a = csets.SetPositions(i * sets_per_seq + s),
             b = gsets.SetPositions(i * sets_per_seq + s);
        const bool oracle = source == SelectionSource::kOracle;
        const std::vector<double> score =
            oracle ? OracleWeights(q, i, hk[i], c.lens[i], s, hps, c.group)
                   : QuestScores(q, i, hk[i], c.lens[i], s, hps, c.group);
        ExpectSameUpToTies(
            {a.begin(), a.end()}, {b.begin(), b.end()}, score, oracle ? 1 : kQuestPageSize,
            oracle ? 2e-3 : 1e-4,
            absl::StrCat(what, " ", SelectionSourceName(source), " seq ", i, " set ", s));
      }
    }
  }
  // The probe on the prepared (window) sets, both layers; rows past the batch hold sentinels.
  prepare();
  const float scale = 1.0f / std::sqrt(float(hd));
  for (int l = 0; l < 2; ++l) {
    Tensor cl = Tensor::HostEmpty(DType::kF32, {n, n_q, 2});
    ASSERT_TRUE(cpu->AttentionRecall(l, q, scale, &cl).ok());
    Tensor guard = Tensor::HostEmpty(DType::kF32, {n + 1, n_q, 2});
    for (int64_t j = 0; j < guard.numel(); ++j) guard.as<float>()[j] = 12345.0f;
    auto gfull = gpu.ToDevice(guard, DType::kF32, MemoryKind::kWorkspace);
    ASSERT_TRUE(gfull.ok());
    Tensor gl(gfull->data(), DType::kF32, {n, n_q, 2}, DeviceKind::kCuda, gfull->storage());
    absl::Status st = gpu.AttentionRecall(l, *gq, scale, &gl);
    ASSERT_TRUE(st.ok()) << what << ": " << st;
    const Tensor back = DeviceToF32(gpu, *gfull);
    for (int64_t j = 0; j < n * n_q * 2; ++j) {
      const float want = cl.as<float>()[j], v = back.as<float>()[j];
      ASSERT_TRUE(std::isfinite(v)) << what << " layer " << l << " entry " << j;
      EXPECT_NEAR(v, want, 2e-3 + 2e-4 * std::abs(want))
          << what << " layer " << l << " entry " << j;
    }
    for (int64_t j = n * n_q * 2; j < guard.numel(); ++j)
      EXPECT_EQ(back.as<float>()[j], 12345.0f) << what;
  }
}

TEST(CudaLayerSelection, OracleQuestAndRecallMatchTheCpu) {
  SPC_GPU_OR_SKIP(gpu);
  const std::vector<Case> cases = {
      {64, 2, 3, 1, SelectionMode::kHeadLevel, {1000, 37, 517, 1}, {128, 16, 64, 8}},
      {128, 1, 8, 4, SelectionMode::kBatchLevel, {2049}, {256}},
      {80, 3, 2, 20, SelectionMode::kHeadLevel, {97, 300}, {33, 33}},
      {64, 2, 5, 1, SelectionMode::kHeadLevel, {4097, 150}, {1000, 200}},
      {64, 4, 2, 17, SelectionMode::kBatchLevel, {613, 2}, {97, 97}},
  };
  for (const Case& c : cases) RunCase(*gpu, c);
}

TEST(CudaLayerSelection, RefusesOffloadedLayersAndModeMismatch) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  SequenceKv kv;
  kv.capacity = 40;
  kv.k.push_back(*gpu->ToDevice(RandomHost({2, 40, 64}, rng), DType::kBF16, MemoryKind::kKvCache));
  kv.v.push_back(*gpu->ToDevice(RandomHost({2, 40, 64}, rng), DType::kBF16, MemoryKind::kKvCache));
  auto pk = gpu->AllocPinnedHost(DType::kBF16, {2, 40, 64}, MemoryKind::kKvCache);
  auto pv = gpu->AllocPinnedHost(DType::kBF16, {2, 40, 64}, MemoryKind::kKvCache);
  ASSERT_TRUE(pk.ok() && pv.ok());
  kv.host_k = {Tensor(), *pk};
  kv.host_v = {Tensor(), *pv};
  kv.k.push_back(*pk);
  kv.v.push_back(*pv);
  BatchDesc b;
  b.seqs = {{0, 1, 30}};
  b.kv = {&kv};
  b.n_tokens = 1;
  ASSERT_TRUE(gpu->PrepareBatch(b).ok());
  IndexSets layout;
  WindowIndexSets(std::vector<int32_t>{30}, std::vector<int32_t>{8}, 2, 2, 1, &layout);
  SparseDecodeDesc desc;
  desc.sets = &layout;
  ASSERT_TRUE(gpu->PrepareSparseDecode(desc).ok());
  auto q = gpu->ToDevice(RandomHost({1, 4, 64}, rng), DType::kBF16, MemoryKind::kWorkspace);
  LayerSelectionSpec spec;
  EXPECT_TRUE(gpu->SelectLayerIndexSets(0, *q, spec).ok());
  EXPECT_EQ(gpu->SelectLayerIndexSets(1, *q, spec).code(), absl::StatusCode::kFailedPrecondition);
  spec.mode = SelectionMode::kBatchLevel;
  EXPECT_EQ(gpu->SelectLayerIndexSets(0, *q, spec).code(), absl::StatusCode::kInvalidArgument);
}

// The decoder with each source and the probe, teacher-forced over the same tokens on both backends.
struct Probe {
  std::vector<double> mean_recall;  // per decode step: mean over layers and heads
  std::vector<float> first_logits;
};

Probe RunDecoder(Backend* backend_raw, std::unique_ptr<Backend> owned, SelectionSource source,
                 int32_t budget) {
  Probe out;
  auto files = TinyFiles(7);
  EXPECT_TRUE(files.ok());
  auto ck = OpenCheckpoint(files->first);
  EXPECT_TRUE(ck.ok());
  Backend* b = owned != nullptr ? owned.get() : backend_raw;
  auto model = Transformer::Load(*ck, b);
  EXPECT_TRUE(model.ok()) << model.status();
  auto head = RetrievalHead::Load(files->second, ck->config, ck->weights.get());
  SparseOptions o;
  o.budget = budget;
  o.source = source;
  o.recall_observer = [&out](const AttentionRecallStep& s) {
    double m = 0;
    for (float v : s.recall) m += v;
    out.mean_recall.push_back(m / s.recall.size());
  };
  auto dec = SparseDecoder::Create(model->get(),
                                   source == SelectionSource::kHead ? head->get() : nullptr, o);
  EXPECT_TRUE(dec.ok()) << dec.status();
  if (!dec.ok()) return out;
  const std::vector<int32_t> prompt = RandomPrompt(40, ck->config.vocab_size, 5);
  const std::vector<int32_t> tokens = RandomPrompt(30, ck->config.vocab_size, 9);
  auto kv = (*dec)->AllocateKv(1, 128, budget);
  EXPECT_TRUE(kv.ok());
  std::vector<SparseStepSeq> seqs = {{1, budget}};
  std::vector<ForwardSeq> fwd = {{prompt, 0, kv->get()}};
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, ck->config.vocab_size});
  EXPECT_TRUE((*dec)->Forward(fwd, seqs, &logits).ok());
  for (size_t i = 0; i < tokens.size(); ++i) {
    fwd = {{std::span<const int32_t>(&tokens[i], 1), static_cast<int32_t>(prompt.size() + i),
            kv->get()}};
    absl::Status st = (*dec)->Forward(fwd, seqs, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) break;
    if (i == 0) out.first_logits.assign(logits.as<float>(), logits.as<float>() + logits.numel());
  }
  return out;
}

TEST(CudaLayerSelection, DecoderWithEachSourceAndTheProbeMatchesTheCpu) {
  SPC_GPU_OR_SKIP(gpu);
  for (SelectionSource source : {SelectionSource::kHead, SelectionSource::kWindow,
                                 SelectionSource::kOracle, SelectionSource::kQuest}) {
    SCOPED_TRACE(SelectionSourceName(source));
    const Probe g = RunDecoder(gpu.get(), nullptr, source, 8);
    const Probe c = RunDecoder(nullptr, MakeCpuBackend(), source, 8);
    ASSERT_EQ(g.mean_recall.size(), 30u);
    ASSERT_EQ(c.mean_recall.size(), 30u);
    double mean_diff = 0;
    for (size_t i = 0; i < 30; ++i) {
      EXPECT_TRUE(std::isfinite(g.mean_recall[i]));
      EXPECT_NEAR(g.mean_recall[i], c.mean_recall[i], 0.1) << "step " << i;
      mean_diff += std::abs(g.mean_recall[i] - c.mean_recall[i]) / 30;
    }
    EXPECT_LT(mean_diff, 0.03);
    ASSERT_EQ(g.first_logits.size(), c.first_logits.size());
    double err = 0, norm = 0;
    for (size_t v = 0; v < g.first_logits.size(); ++v) {
      err += std::pow(g.first_logits[v] - c.first_logits[v], 2);
      norm += std::pow(c.first_logits[v], 2);
    }
    EXPECT_LT(std::sqrt(err / norm), 0.05);  // bf16 model vs f32
  }
}

}  // namespace
}  // namespace specontext::testing
