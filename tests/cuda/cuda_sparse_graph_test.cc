// CUDA graphs of the sparse decode step (core/model/transformer_graph.cc, core/cuda/cuda_graph.cc): a
// SparseDecoder whose decode steps replay a recorded graph must give bitwise the logits of the same decoder
// run op by op (graphs off), step after step, while the index sets change every step (real selection and
// the synthetic-overlap rewrite), the device KV grows in small chunks (its buffers move, so the per-layer
// tables are rewritten between replays), a second sequence joins (prompt chunks beside a decode: the
// decode pass alone is graphed; batch size 2 gets its own graph) and layers move to host (the resident
// layers before them recorded as a prefix graph, the offloaded ones and the LM head as a suffix graph
// waiting on the elastic loads the host enqueues on the copy stream in between). Both decoders share one backend and one model; the backend's graph switch is
// flipped before each call, which also checks that another decoder's state in between is not replayed. With
// the weak-retrieval fallback on, the weak sequences' resident layers read their whole past (a per-sequence
// flag the recording reads, not a variant of its own).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "core/cuda/cuda_backend_impl.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/sparse/head_fixture.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

struct Fixture {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<RetrievalHead> layer_head;
};

std::unique_ptr<Fixture> Load(std::unique_ptr<Backend> backend, uint64_t seed) {
  auto files = TinyFiles(seed);
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return nullptr;
  auto f = std::make_unique<Fixture>();
  auto ck = OpenCheckpoint(files->first);
  EXPECT_TRUE(ck.ok()) << ck.status();
  if (!ck.ok()) return nullptr;
  f->checkpoint = *std::move(ck);
  f->backend = std::move(backend);
  auto m = Transformer::Load(f->checkpoint, f->backend.get());
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  f->model = *std::move(m);
  auto h = RetrievalHead::Load(files->second, f->checkpoint.config, f->checkpoint.weights.get());
  EXPECT_TRUE(h.ok()) << h.status();
  if (!h.ok()) return nullptr;
  f->layer_head = *std::move(h);
  return f;
}

struct Run {
  std::unique_ptr<SparseDecoder> dec;
  std::unique_ptr<SequenceKv> kv[2];
};

// One sequence's token stream (shared by both runs: the graph run's greedy tokens drive both).
struct Stream {
  std::vector<int32_t> tokens;
  int32_t len = 0;      // tokens with KV
  int32_t joins = 0;    // step at which it starts
};

// Drives `graph` (step graphs on) and `eager` (off) through the same steps and compares their logits
// bitwise. `overlap` > 0 turns the synthetic-overlap rewrite on. Returns the graph stats delta.
void CompareRuns(Fixture& f, const RetrievalHead& head, double overlap, uint32_t seed, double fallback_mass = 0) {
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(f.backend.get());
  ASSERT_NE(cuda, nullptr);
  const int64_t vocab = f.checkpoint.config.vocab_size;
  constexpr int32_t kB = 8, kCap = 160;
  SparseOptions o;
  o.budget = kB;
  o.kv_grow_rows = 8;  // the resident KV moves every 8 tokens
  o.synthetic_overlap = overlap;
  o.fallback_mass = fallback_mass;
  Run runs[2];
  for (Run& r : runs) {
    auto d = SparseDecoder::Create(f.model.get(), &head, o);
    ASSERT_TRUE(d.ok()) << d.status();
    r.dec = *std::move(d);
    for (int s = 0; s < 2; ++s) {
      auto kv = r.dec->AllocateKv(s + 1, kCap, kB);
      ASSERT_TRUE(kv.ok()) << kv.status();
      r.kv[s] = *std::move(kv);
    }
  }
  std::mt19937 rng(seed);
  Stream streams[2];
  streams[0].tokens = RandomPrompt(13, vocab, rng());
  streams[1].tokens = RandomPrompt(21, vocab, rng());
  streams[1].joins = 30;
  const auto before = cuda->graph_stats();
  int64_t decode_compares = 0, replays_resident = 0;
  for (int step = 0; step < 90; ++step) {
    // Layers moving to host: the resident layers before them are recorded as a prefix graph, the
    // offloaded ones as a suffix graph (elastic loads on the copy stream in between).
    if (step == 70 || step == 80) {
      for (Run& r : runs) ASSERT_TRUE(r.dec->OffloadLayers(step == 70 ? 2 : 1).ok());
      if (step == 70) replays_resident = cuda->graph_stats().replays;
    }
    // Per sequence: a prompt chunk of up to 8 tokens while its prompt lasts, else one decode token.
    std::vector<ForwardSeq> fwd[2];
    std::vector<SparseStepSeq> ids;
    std::vector<int> which;
    for (int s = 0; s < 2; ++s) {
      Stream& st = streams[s];
      if (step < st.joins) continue;
      const int32_t left = static_cast<int32_t>(st.tokens.size()) - st.len;
      const int32_t n = std::min(left, 8);
      for (int r = 0; r < 2; ++r) {
        fwd[r].push_back({std::span<const int32_t>(st.tokens.data() + st.len, n), st.len, runs[r].kv[s].get()});
      }
      ids.push_back({static_cast<uint64_t>(s + 1), kB});
      which.push_back(s);
    }
    const int64_t rows = static_cast<int64_t>(which.size());
    Tensor logits[2] = {Tensor::HostEmpty(DType::kF32, {rows, vocab}), Tensor::HostEmpty(DType::kF32, {rows, vocab})};
    for (int r = 0; r < 2; ++r) {
      cuda->set_step_graphs(r == 0);
      absl::Status st = runs[r].dec->Forward(fwd[r], ids, &logits[r]);
      ASSERT_TRUE(st.ok()) << (r == 0 ? "graph" : "eager") << " run, step " << step << ": " << st;
    }
    cuda->set_step_graphs(true);
    for (int64_t i = 0; i < rows; ++i) {
      const float* g = logits[0].as<float>() + i * vocab;
      const float* e = logits[1].as<float>() + i * vocab;
      ASSERT_EQ(std::memcmp(g, e, sizeof(float) * vocab), 0)
          << "step " << step << ", sequence " << which[i] << " at " << streams[which[i]].len << " tokens";
      for (int64_t v = 0; v < vocab; ++v) ASSERT_TRUE(std::isfinite(g[v]));
      Stream& st = streams[which[i]];
      const bool decoding = static_cast<int32_t>(st.tokens.size()) - st.len == 1;
      decode_compares += decoding ? 1 : 0;
      st.len += static_cast<int32_t>(fwd[0][i].tokens.size());
      if (st.len == static_cast<int32_t>(st.tokens.size())) {
        st.tokens.push_back(static_cast<int32_t>(std::max_element(g, g + vocab) - g));
      }
    }
  }
  const auto after = cuda->graph_stats();
  EXPECT_GT(decode_compares, 100);
  const SparseEngineStats gs = runs[0].dec->stats(), es = runs[1].dec->stats();
  EXPECT_EQ(gs.weak_retrieval_fallback_sequences, es.weak_retrieval_fallback_sequences);
  if (fallback_mass == 1.0) {
    // Every sequence weak at every sparse step: the plan's rounded lengths keep one recording for many steps.
    EXPECT_EQ(gs.weak_retrieval_fallback_steps, gs.sparse_steps);
  } else if (fallback_mass > 0) {
    // The weak sequences change from step to step (a changed set of them re-records): the logits must still be
    // bitwise the op-by-op ones; how often the graphs replay depends on the head.
    std::printf("fallback %.2f: %lld weak sequence-steps of %lld steps, %lld replays, %lld captures\n", fallback_mass,
                static_cast<long long>(gs.weak_retrieval_fallback_sequences),
                static_cast<long long>(gs.sparse_steps), static_cast<long long>(after.replays - before.replays),
                static_cast<long long>(after.captures - before.captures));
    EXPECT_EQ(after.fallbacks, before.fallbacks) << "a sparse step could not be recorded";
    return;
  }
  // Batch sizes 1 and 2 were recorded (again when the KV moved or a set size changed) and replayed often.
  EXPECT_GE(after.captures - before.captures, 2);
  EXPECT_GT(after.replays - before.replays, 40);
  EXPECT_EQ(after.fallbacks, before.fallbacks) << "a sparse step could not be recorded";
  EXPECT_GT(after.replays - replays_resident, 20) << "prefix and suffix graphs were not replayed";
  EXPECT_GT(runs[0].dec->stats().elastic.rows_loaded, 0);
  // The suffix graph's load waits are timed too (external event nodes): copy time hidden vs exposed.
  EXPECT_GT(runs[0].dec->stats().elastic.copy_timed_loads, 5);
  EXPECT_GT(runs[1].dec->stats().elastic.copy_timed_loads, 5);
  EXPECT_GT(runs[0].dec->stats().sparse_steps, 60);
  EXPECT_GT(runs[0].dec->stats().kv_grows, 10);
  EXPECT_EQ(runs[0].dec->stats().sparse_steps, runs[1].dec->stats().sparse_steps);
}

TEST(CudaSparseGraph, LayerHeadReplaysGiveBitwiseTheOpByOpLogits) {
  SPC_GPU_OR_SKIP(gpu);
  auto f = Load(std::move(gpu), 7);
  ASSERT_NE(f, nullptr);
  CompareRuns(*f, *f->layer_head, 0, FreshSeed());
}

TEST(CudaSparseGraph, SyntheticOverlapReplaysGiveBitwiseTheOpByOpLogits) {
  SPC_GPU_OR_SKIP(gpu);
  auto f = Load(std::move(gpu), 7);
  ASSERT_NE(f, nullptr);
  CompareRuns(*f, *f->layer_head, 0.6, FreshSeed());
}

// The weak-retrieval fallback per sequence: every sequence weak (threshold 1), and a threshold in between.
TEST(CudaSparseGraph, WeakRetrievalFallbackReplaysGiveBitwiseTheOpByOpLogits) {
  SPC_GPU_OR_SKIP(gpu);
  auto f = Load(std::move(gpu), 7);
  ASSERT_NE(f, nullptr);
  for (double mass : {1.0, 0.5}) {
    SCOPED_TRACE(mass);
    CompareRuns(*f, *f->layer_head, 0, FreshSeed(), mass);
  }
}

// An EAGLE-3 head: the forward captures hidden states into the decoder's buffer inside the graph.
TEST(CudaSparseGraph, Eagle3CaptureReplaysGiveBitwiseTheOpByOpLogits) {
  SPC_GPU_OR_SKIP(gpu);
  auto f = Load(std::move(gpu), 7);
  ASSERT_NE(f, nullptr);
  std::mt19937 rng(FreshSeed());
  testing_sparse::HeadShape shape;
  shape.kind = RetrievalHeadKind::kEagle3;
  auto eh = testing_sparse::MakeRandomHead(shape, rng, &f->checkpoint.config, f->checkpoint.weights.get());
  ASSERT_TRUE(eh.ok()) << eh.status();
  CompareRuns(*f, *eh->head, 0, rng());
}

}  // namespace
}  // namespace specontext::testing
