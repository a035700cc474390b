// SparseDecoder on the CUDA backend: the retrieval head, its K caches, the hidden-state capture of EAGLE-3
// heads and the selection all run on the GPU. A tiny random checkpoint with a pruned `layer` head:
// budget >= length gives the dense CUDA engine's greedy tokens; offloaded layers run sparse attention;
// the synthetic-overlap hook controls the elastic loader's overlap; an eagle3 head's K cache on the GPU
// matches the CPU decoder's for the same token stream (bf16 bound).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/model/engine.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/sparse/head_fixture.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

struct GpuTiny {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<RetrievalHead> head;
};

std::unique_ptr<GpuTiny> LoadOn(std::unique_ptr<Backend> backend) {
  auto files = TinyFiles(7);
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return nullptr;
  auto t = std::make_unique<GpuTiny>();
  auto ck = OpenCheckpoint(files->first);
  EXPECT_TRUE(ck.ok()) << ck.status();
  t->checkpoint = *std::move(ck);
  t->backend = std::move(backend);
  auto m = Transformer::Load(t->checkpoint, t->backend.get());
  EXPECT_TRUE(m.ok()) << m.status();
  t->model = *std::move(m);
  auto h = RetrievalHead::Load(files->second, t->checkpoint.config, t->checkpoint.weights.get());
  EXPECT_TRUE(h.ok()) << h.status();
  t->head = *std::move(h);
  return t;
}

std::shared_ptr<SparseDecoder> Decoder(Transformer* model, const RetrievalHead* head, int32_t budget,
                                       double overlap = 0, int32_t grow_rows = SparseOptions{}.kv_grow_rows) {
  SparseOptions o;
  o.budget = budget;
  o.synthetic_overlap = overlap;
  o.kv_grow_rows = grow_rows;
  auto d = SparseDecoder::Create(model, head, o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? std::shared_ptr<SparseDecoder>(std::move(*d)) : nullptr;
}

TEST(CudaSparseDecoder, BudgetAtLeastTheLengthGivesTheDenseTokens) {
  SPC_GPU_OR_SKIP(gpu);
  auto t = LoadOn(std::move(gpu));
  ASSERT_NE(t, nullptr);
  const std::vector<int32_t> prompt = RandomPrompt(10, t->checkpoint.config.vocab_size, 5);
  Engine dense(t->model.get(), nullptr, EngineOptions{});
  const std::vector<int32_t> want = Greedy(dense, prompt, 40);
  ASSERT_EQ(want.size(), 40u);
  EngineOptions eo;
  eo.sparse = Decoder(t->model.get(), t->head.get(), 64);
  Engine sparse(t->model.get(), nullptr, eo);
  EXPECT_EQ(Greedy(sparse, prompt, 40), want);
  EXPECT_GT(sparse.sparse_stats().dense_steps, 0);

  // Layers 1.. offloaded: sparse attention over slot buffers holding every past token (another kernel, so
  // bf16 rounding may differ; the tokens agree at least for a while).
  auto dec = Decoder(t->model.get(), t->head.get(), 64);
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  eo.sparse = dec;
  Engine offloaded(t->model.get(), nullptr, eo);
  const std::vector<int32_t> got = Greedy(offloaded, prompt, 40);
  ASSERT_EQ(got.size(), want.size());
  const size_t prefix = std::mismatch(got.begin(), got.end(), want.begin()).first - got.begin();
  EXPECT_GE(prefix, 8u);
  std::printf("offloaded sparse vs dense: %zu of 40 tokens agree before the first difference\n", prefix);
  EXPECT_GT(offloaded.sparse_stats().sparse_steps, 0);
  EXPECT_GT(offloaded.sparse_stats().elastic.rows_loaded, 0);
}

// The deferred selection (sets left on the device, the elastic plan run while the resident layers compute)
// against the host waiting for the sets first: the same kernels over the same sets, so bitwise the same
// logits, sets and slot maps at every step, with layers moving to host and back in between.
TEST(CudaSparseDecoder, DeferredSelectionGivesTheWaitingDecodersSteps) {
  SPC_GPU_OR_SKIP(gpu);
  auto t = LoadOn(std::move(gpu));
  ASSERT_NE(t, nullptr);
  const int32_t vocab = t->checkpoint.config.vocab_size;
  for (int32_t budget : {8, 24}) {
    SCOPED_TRACE(budget);
    SparseOptions o;
    o.budget = budget;
    auto deferred = SparseDecoder::Create(t->model.get(), t->head.get(), o);
    o.defer_selection = false;
    auto waiting = SparseDecoder::Create(t->model.get(), t->head.get(), o);
    ASSERT_TRUE(deferred.ok() && waiting.ok());
    SparseDecoder* decs[2] = {deferred->get(), waiting->get()};
    std::unique_ptr<SequenceKv> kv[2];
    for (int d = 0; d < 2; ++d) {
      auto k = decs[d]->AllocateKv(d + 1, 96, 0);
      ASSERT_TRUE(k.ok()) << k.status();
      kv[d] = *std::move(k);
    }
    std::vector<int32_t> tokens = RandomPrompt(30, vocab, 11 + budget);
    int32_t past = 0;
    std::mt19937 rng(budget);
    for (int step = 0; step < 40; ++step) {
      if (step == 6 || step == 20) {
        for (SparseDecoder* d : decs) ASSERT_TRUE(d->OffloadLayers(step == 6 ? 1 : 0).ok());
      }
      if (step == 30) {
        for (SparseDecoder* d : decs) ASSERT_TRUE(d->OffloadLayers(2).ok());
      }
      std::vector<float> logits[2];
      const std::span<const int32_t> in = step == 0 ? std::span<const int32_t>(tokens)
                                                    : std::span<const int32_t>(&tokens.back(), 1);
      for (int d = 0; d < 2; ++d) {
        const ForwardSeq fwd{in, past, kv[d].get()};
        const SparseStepSeq seq{static_cast<uint64_t>(d + 1), budget};
        Tensor out = Tensor::HostEmpty(DType::kF32, {1, vocab});
        ASSERT_TRUE(decs[d]->Forward({&fwd, 1}, {&seq, 1}, &out).ok()) << "step " << step;
        logits[d].assign(out.as<float>(), out.as<float>() + vocab);
      }
      past += static_cast<int32_t>(in.size());
      ASSERT_EQ(logits[0], logits[1]) << "step " << step;
      if (step > 0) {
        EXPECT_EQ(decs[0]->last_sets().indices, decs[1]->last_sets().indices) << "step " << step;
        EXPECT_EQ(decs[0]->last_sets().indptr, decs[1]->last_sets().indptr) << "step " << step;
      }
      const SlotMap *m0 = decs[0]->slot_map(1), *m1 = decs[1]->slot_map(2);
      ASSERT_EQ(m0 == nullptr, m1 == nullptr);
      for (int32_t set = 0; m0 != nullptr && set < m0->n_sets(); ++set) {
        const auto t0 = m0->tokens(set), t1 = m1->tokens(set), s0 = m0->slots(set), s1 = m1->slots(set);
        EXPECT_TRUE(std::equal(t0.begin(), t0.end(), t1.begin(), t1.end())) << "step " << step << " set " << set;
        EXPECT_TRUE(std::equal(s0.begin(), s0.end(), s1.begin(), s1.end())) << "step " << step << " set " << set;
      }
      tokens.push_back(static_cast<int32_t>(rng() % vocab));
    }
    EXPECT_GT(decs[0]->stats().sparse_steps, 20);
    EXPECT_GT(decs[0]->stats().elastic.rows_loaded, 0);
    EXPECT_EQ(decs[0]->stats().elastic.rows_loaded, decs[1]->stats().elastic.rows_loaded);
    for (int d = 0; d < 2; ++d) decs[d]->Release(d + 1);
  }
}

TEST(CudaSparseDecoder, SyntheticOverlapControlsTheElasticOverlap) {
  SPC_GPU_OR_SKIP(gpu);
  auto t = LoadOn(std::move(gpu));
  ASSERT_NE(t, nullptr);
  auto dec = Decoder(t->model.get(), t->head.get(), 16, 0.8);
  ASSERT_TRUE(dec->OffloadLayers(1).ok());
  EngineOptions eo;
  eo.sparse = dec;
  Engine e(t->model.get(), nullptr, eo);
  Greedy(e, RandomPrompt(40, t->checkpoint.config.vocab_size, 9), 60);
  const SparseEngineStats st = e.sparse_stats();
  EXPECT_GT(st.sparse_steps, 50);
  EXPECT_TRUE(ValidateIndexSets(dec->last_sets()).ok());
  // round(0.8 · 16) = 13 of 16 kept once the sequence is long enough for fresh positions.
  EXPECT_NEAR(st.elastic.overlap_ratio(), 13.0 / 16, 0.03);
}

// A prompt in two chunks while layers are offloaded (dense prefill attention over mapped host KV with a
// past), with the `layer` head: the GPU decoder's logits follow the CPU decoder's.
TEST(CudaSparseDecoder, OffloadedPromptChunksWithAPast) {
  SPC_GPU_OR_SKIP(gpu);
  auto g = LoadOn(std::move(gpu));
  auto c = LoadOn(MakeCpuBackend());
  ASSERT_TRUE(g != nullptr && c != nullptr);
  auto gd = Decoder(g->model.get(), g->head.get(), 64), cd = Decoder(c->model.get(), c->head.get(), 64);
  ASSERT_TRUE(gd->OffloadLayers(1).ok());
  ASSERT_TRUE(cd->OffloadLayers(1).ok());
  const int64_t vocab = c->checkpoint.config.vocab_size;
  auto gkv = gd->AllocateKv(1, 64, 64), ckv = cd->AllocateKv(1, 64, 64);
  ASSERT_TRUE(gkv.ok() && ckv.ok());
  std::vector<int32_t> tokens = RandomPrompt(20, vocab, 13);
  Tensor gl = Tensor::HostEmpty(DType::kF32, {1, vocab}), cl = Tensor::HostEmpty(DType::kF32, {1, vocab});
  for (auto [begin, n] : std::vector<std::pair<int32_t, int32_t>>{{0, 7}, {7, 6}, {13, 1}, {14, 6}}) {
    std::span<const int32_t> toks(tokens.data() + begin, n);
    ForwardSeq fg{toks, begin, gkv->get()}, fc{toks, begin, ckv->get()};
    absl::Status st = gd->Forward({&fg, 1}, std::vector<SparseStepSeq>{{1, 64}}, &gl);
    ASSERT_TRUE(st.ok()) << "gpu, tokens [" << begin << ", " << begin + n << "): " << st;
    ASSERT_TRUE(cd->Forward({&fc, 1}, std::vector<SparseStepSeq>{{1, 64}}, &cl).ok());
    double err = 0, scale = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      err = std::max(err, std::fabs(double(gl.as<float>()[i]) - cl.as<float>()[i]));
      scale = std::max(scale, std::fabs(double(cl.as<float>()[i])));
    }
    EXPECT_LT(err / scale, 5e-2) << "tokens [" << begin << ", " << begin + n << ")";
  }
}

// Resident layers' KV growing in chunks of 8 rows (the attention kernels then see per-layer row counts:
// resident layers fewer than the capacity, offloaded layers' host copies the whole capacity) against the same
// decoder holding the capacity from admission: bitwise the same logits, through prompt chunks with a past,
// decode steps with sparse attention, and a layer moved to host midway (prefill staging of its host rows).
TEST(CudaSparseDecoder, GrowingDeviceKvGivesBitwiseTheSameLogits) {
  SPC_GPU_OR_SKIP(gpu);
  auto g = LoadOn(std::move(gpu));
  ASSERT_NE(g, nullptr);
  constexpr int32_t kB = 8, kCap = 96;
  auto grow = Decoder(g->model.get(), g->head.get(), kB, 0, 8), full = Decoder(g->model.get(), g->head.get(), kB, 0, 0);
  const int64_t vocab = g->checkpoint.config.vocab_size;
  auto gkv = grow->AllocateKv(1, kCap, kB), fkv = full->AllocateKv(1, kCap, kB);
  ASSERT_TRUE(gkv.ok() && fkv.ok());
  EXPECT_EQ((*gkv)->k[0].dim(1), 8);
  EXPECT_EQ((*fkv)->k[0].dim(1), kCap);
  std::vector<int32_t> tokens = RandomPrompt(11, vocab, 17);
  Tensor gl = Tensor::HostEmpty(DType::kF32, {1, vocab}), fl = Tensor::HostEmpty(DType::kF32, {1, vocab});
  int32_t len = 0;
  for (int step = 0; step < 60; ++step) {
    if (step == 20) {
      ASSERT_TRUE(grow->OffloadLayers(1).ok());
      ASSERT_TRUE(full->OffloadLayers(1).ok());
    }
    // Prompt chunks first (7, then 4 tokens, then 9 more at step 30), else one decode token.
    const int32_t n = step == 0 ? 7 : step == 1 ? 4 : step == 30 ? 9 : 1;
    while (static_cast<int32_t>(tokens.size()) < len + n) tokens.push_back(static_cast<int32_t>(tokens.size() * 7 % vocab));
    std::span<const int32_t> toks(tokens.data() + len, n);
    ForwardSeq fg{toks, len, gkv->get()}, ff{toks, len, fkv->get()};
    ASSERT_TRUE(grow->Forward({&fg, 1}, std::vector<SparseStepSeq>{{1, kB}}, &gl).ok()) << "step " << step;
    ASSERT_TRUE(full->Forward({&ff, 1}, std::vector<SparseStepSeq>{{1, kB}}, &fl).ok()) << "step " << step;
    len += n;
    ASSERT_EQ(std::memcmp(gl.data(), fl.data(), gl.nbytes()), 0) << "step " << step << ", " << len << " tokens";
    const float* lg = gl.as<float>();
    tokens.resize(len);
    tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + vocab) - lg));
    EXPECT_EQ((*gkv)->k[0].dim(1), (len + 7) / 8 * 8) << "the resident layer holds the rows reached, rounded to 8";
  }
  EXPECT_GT(grow->stats().kv_grows, 5);
  EXPECT_GT(grow->stats().sparse_steps, 20);
}

// The engine in sparse mode samples on the device (SparseDecoder::ForwardDevice): the same tokens as
// downloading the logits and sampling on the host, greedy and seeded, with a request arriving while another
// decodes (steps mixing a prompt chunk and decode tokens: two passes whose device logits are merged) and
// offloaded layers.
TEST(CudaSparseDecoder, DeviceSamplingGivesTheHostSampledTokens) {
  SPC_GPU_OR_SKIP(gpu);
  auto t = LoadOn(std::move(gpu));
  ASSERT_NE(t, nullptr);
  const int32_t vocab = static_cast<int32_t>(t->checkpoint.config.vocab_size);
  auto run = [&](bool device_sampling) {
    auto dec = Decoder(t->model.get(), t->head.get(), 8);
    EXPECT_TRUE(dec->OffloadLayers(1).ok());
    EngineOptions eo;
    eo.sparse = dec;
    eo.device_sampling = device_sampling;
    eo.max_tokens_per_step = 16;  // a 40-token prompt takes several steps beside the other's decode
    Engine e(t->model.get(), nullptr, eo);
    std::vector<std::vector<int32_t>> got(3);
    auto submit = [&](int i) {
      GenerationRequest r;
      r.prompt = RandomPrompt(i == 1 ? 40 : 9 + i, vocab, 50 + i);
      r.max_new_tokens = 30;
      r.ignore_eos = true;
      if (i == 2) r.sampling = {0.8f, 20, 0.9f, 1234};
      EXPECT_TRUE(e.Submit(r, [&got, i](const StreamEvent& ev) {
                     if (ev.token >= 0) got[i].push_back(ev.token);
                   }).ok());
    };
    submit(0);
    for (int k = 0; k < 4; ++k) EXPECT_TRUE(e.Step().ok());
    submit(1);
    submit(2);
    while (e.HasWork()) EXPECT_TRUE(e.Step().ok());
    EXPECT_GT(e.sparse_stats().sparse_steps, 10);
    return got;
  };
  const auto host = run(false), device = run(true);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(host[i].size(), 30u) << "request " << i;
    EXPECT_EQ(device[i], host[i]) << "request " << i;
  }
}

TEST(CudaSparseDecoder, Eagle3CacheOnTheGpuMatchesTheCpuDecoder) {
  SPC_GPU_OR_SKIP(gpu);
  auto g = LoadOn(std::move(gpu));
  auto c = LoadOn(MakeCpuBackend());
  ASSERT_TRUE(g != nullptr && c != nullptr);
  std::mt19937 rng(FreshSeed());
  testing_sparse::HeadShape shape;
  shape.kind = RetrievalHeadKind::kEagle3;
  auto eh = testing_sparse::MakeRandomHead(shape, rng, &c->checkpoint.config, c->checkpoint.weights.get());
  ASSERT_TRUE(eh.ok()) << eh.status();
  const RetrievalHead& head = *eh->head;
  // B covers the whole sequence: both decoders attend to every position, so only rounding differs.
  auto gd = Decoder(g->model.get(), &head, 64), cd = Decoder(c->model.get(), &head, 64);
  const int64_t vocab = c->checkpoint.config.vocab_size;
  auto gkv = gd->AllocateKv(1, 64, 64), ckv = cd->AllocateKv(1, 64, 64);
  ASSERT_TRUE(gkv.ok() && ckv.ok());
  // The same forced token stream: a prompt in two chunks, then single tokens.
  std::vector<int32_t> tokens = RandomPrompt(40, vocab, 11);
  std::vector<std::pair<int32_t, int32_t>> steps = {{0, 7}, {7, 5}};  // {first token, count}
  for (int32_t p = 12; p < 40; ++p) steps.push_back({p, 1});
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  for (auto [begin, n] : steps) {
    if (begin == 12) {  // decode with the last layer offloaded: sparse attention, elastic loads
      ASSERT_TRUE(gd->OffloadLayers(2).ok());
      ASSERT_TRUE(cd->OffloadLayers(2).ok());
    }
    std::span<const int32_t> toks(tokens.data() + begin, n);
    ForwardSeq fg{toks, begin, gkv->get()}, fc{toks, begin, ckv->get()};
    absl::Status st = gd->Forward({&fg, 1}, std::vector<SparseStepSeq>{{1, 64}}, &logits);
    ASSERT_TRUE(st.ok()) << "gpu, tokens [" << begin << ", " << begin + n << "): " << st;
    st = cd->Forward({&fc, 1}, std::vector<SparseStepSeq>{{1, 64}}, &logits);
    ASSERT_TRUE(st.ok()) << "cpu, tokens [" << begin << ", " << begin + n << "): " << st;
  }
  EXPECT_GT(gd->stats().sparse_steps, 0);
  ASSERT_EQ(gd->retrieval_len(1), 40);
  const Tensor got = DeviceToF32(*g->backend, *gd->retrieval_cache(1));
  const Tensor& want = *cd->retrieval_cache(1);
  double err = 0, norm = 0;
  const int64_t nkv = head.n_kv_heads(), hd = head.head_dim();
  for (int64_t k = 0; k < nkv; ++k) {
    for (int64_t p = 0; p < 40; ++p) {
      for (int64_t e = 0; e < hd; ++e) {
        const int64_t i = (k * 64 + p) * hd + e;
        ASSERT_TRUE(std::isfinite(got.as<float>()[i]));
        err += std::pow(double(got.as<float>()[i]) - want.as<float>()[i], 2);
        norm += std::pow(double(want.as<float>()[i]), 2);
      }
    }
  }
  EXPECT_LT(std::sqrt(err / norm), 3e-2) << "relative error of the eagle3 K cache, GPU vs CPU";
}

}  // namespace
}  // namespace specontext::testing
