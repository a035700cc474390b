// Sparse tensor-parallel runs for tests, on any backend: the CPU test (tests/sparse_engine/tensor_parallel_sparse_test.cc,
// the in-process group) and the CUDA one (tests/cuda/cuda_tensor_parallel_test.cc, the host-staged group) drive the
// same ragged batch through one SparseDecoder per rank and compare it with an unsharded sparse run.
#pragma once

#include <algorithm>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/model/sparse_tensor_parallel.h"
#include "tests/common/stories260k_shape.h"
#include "tests/common/tensor_parallel_ranks.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {

inline constexpr int kSparseTpDecodeSteps = 14;

struct SparseTpFiles {
  std::string model, head;
};

// A random checkpoint of stories260K's shape and its pruned layer head.
inline absl::StatusOr<SparseTpFiles> Stories260kShapedFiles() {
  SparseTpFiles f{TestDir("stories260k_model"), TestDir("stories260k_head")};
  if (std::filesystem::exists(f.head + "/config.json")) return f;
  ASSIGN_OR_RETURN(ModelConfig c, RandomCheckpointPreset("tiny-llama-tied-gqa"));
  SetStories260kShape(c);
  RandomCheckpointOptions o;
  o.dtype = DType::kF32;
  o.seed = 11;
  o.num_threads = 2;
  RETURN_IF_ERROR(WriteRandomCheckpoint(c, f.model, o));
  RETURN_IF_ERROR(PruneToRetrievalHead(f.model, RetrievalHeadKind::kLayer, c, "stories260k-shaped", f.head).status());
  return f;
}

inline absl::StatusOr<SparseTpFiles> TinyGqaFiles() {
  ASSIGN_OR_RETURN(auto files, TinyFiles(7));
  return SparseTpFiles{files.first, files.second};
}

struct SparseTpSetup {
  SparseOptions options;
  int32_t offload_to = -1;  // OffloadLayers(offload_to) before the first admission; -1: none
  // Per-rank planner limits, in rows of one resident layer set beyond the fixed bytes (0: planner off).
  std::vector<int32_t> limit_rows;
};

// Every step's logits [n_seqs][vocab] (rows in the step's sequence order), greedy tokens per sequence, the
// sets of each decode step and the resident layers after each step.
struct SparseTpTrace {
  std::vector<std::vector<float>> logits;
  std::vector<std::vector<int32_t>> tokens;
  std::vector<IndexSets> sets;
  std::vector<int32_t> gpu_layers;
  SparseEngineStats stats;
};

// Tokens to feed instead of a rank's own greedy ones, per sequence ([3][its steps]): a reference run's
// SparseTpTrace::tokens (bf16 runs, so that a near tie cannot fork the runs).
using SparseTpFeed = std::vector<std::vector<int32_t>>;

// Runs the ragged batch on one rank (its backend's device current on the calling thread): sequences 0 and 1 prefill together, decode; sequence 2 is admitted at
// decode step 3 (its prompt runs beside the others' decode tokens) and decodes from then on.
inline absl::StatusOr<SparseTpTrace> RunSparseTpRank(const Checkpoint& ck, const RetrievalHead* head, Backend* backend,
                                                     const TensorParallel& tp, const SparseTpSetup& setup,
                                                     const SparseTpFeed* feed = nullptr) {
  ASSIGN_OR_RETURN(std::unique_ptr<Transformer> model, Transformer::Load(ck, backend, {}, tp));
  SparseOptions o = setup.options;
  std::unique_ptr<SparseDecoder> probe;
  if (!setup.limit_rows.empty()) {
    // A probe decoder (kept alive: its head copy is part of what the real one measures) gives the fixed bytes.
    SparseOptions po = o;
    po.gpu_memory_limit = int64_t{1} << 40;
    ASSIGN_OR_RETURN(probe, SparseDecoder::Create(model.get(), head, po));
    const MemoryPlanner& p = *probe->planner();
    o.gpu_memory_limit = static_cast<int64_t>(p.fixed_bytes() + probe->device_head().weight_bytes() +
                                              setup.limit_rows[tp.rank] * p.PerTokenBytes(0));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SparseDecoder> dec, SparseDecoder::Create(model.get(), head, o));
  if (setup.offload_to >= 0) RETURN_IF_ERROR(dec->OffloadLayers(setup.offload_to));
  const int64_t vocab = model->config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {RandomPrompt(21, vocab, 1), RandomPrompt(9, vocab, 2),
                                                     RandomPrompt(15, vocab, 3)};
  const std::vector<int32_t> budgets = {6, 4, 8};
  std::vector<std::unique_ptr<SequenceKv>> kvs(3);
  std::vector<int32_t> past(3, 0);
  std::vector<std::vector<int32_t>> next = prompts;
  SparseTpTrace trace;
  trace.tokens.resize(3);
  auto admit = [&](int i) -> absl::Status {
    ASSIGN_OR_RETURN(kvs[i], dec->AllocateKv(i + 1, static_cast<int32_t>(prompts[i].size()) + kSparseTpDecodeSteps + 2,
                                             budgets[i]));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(admit(0));
  RETURN_IF_ERROR(admit(1));
  for (int step = 0; step <= kSparseTpDecodeSteps; ++step) {
    if (step == 3) RETURN_IF_ERROR(admit(2));
    std::vector<ForwardSeq> fwd;
    std::vector<SparseStepSeq> seqs;
    std::vector<int> which;
    for (int i = 0; i < 3; ++i) {
      if (kvs[i] == nullptr) continue;
      fwd.push_back({next[i], past[i], kvs[i].get()});
      seqs.push_back({static_cast<uint64_t>(i + 1), budgets[i]});
      which.push_back(i);
    }
    Tensor logits = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(fwd.size()), vocab});
    RETURN_IF_ERROR(dec->Forward(fwd, seqs, &logits));
    for (size_t j = 0; j < which.size(); ++j) {
      const int i = which[j];
      const float* row = logits.as<float>() + j * vocab;
      trace.logits.emplace_back(row, row + vocab);
      past[i] += static_cast<int32_t>(next[i].size());
      const int32_t tok = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      trace.tokens[i].push_back(tok);
      next[i] = {feed != nullptr ? (*feed)[i][trace.tokens[i].size() - 1] : tok};
    }
    trace.sets.push_back(dec->last_sets());
    trace.gpu_layers.push_back(dec->gpu_layers());
  }
  trace.stats = dec->stats();
  return trace;
}

// Every rank on its own thread: rank r makes backends[r] current and runs RunSparseTpRank over comms[r]; a rank
// that fails aborts the group so that the others return instead of waiting.
inline std::vector<absl::StatusOr<SparseTpTrace>> RunSparseTpRanks(const Checkpoint& ck, const RetrievalHead* head,
                                                                   std::span<Backend* const> backends,
                                                                   std::span<const std::unique_ptr<Communicator>> comms,
                                                                   const SparseTpSetup& setup,
                                                                   const SparseTpFeed* feed = nullptr) {
  return RunOnRanks<SparseTpTrace>(backends, comms, [&](Backend* backend, TensorParallel tp) {
    return RunSparseTpRank(ck, head, backend, tp, setup, feed);
  });
}

// The sets rank `rank` of `size` must hold: the unsharded sets of its KV heads (head-level), or the same
// shared sets addressed to its KV heads (batch-level).
inline void ExpectRankSets(const IndexSets& want, const IndexSets& got, int rank, int size, int step) {
  ASSERT_EQ(got.n_seqs, want.n_seqs) << "step " << step;
  if (want.n_seqs == 0) return;
  ASSERT_EQ(got.n_kv_heads * size, want.n_kv_heads) << "step " << step;
  ASSERT_EQ(got.sets_per_seq, want.sets_per_seq == 1 ? 1 : got.n_kv_heads) << "step " << step;
  ASSERT_EQ(got.seq_len, want.seq_len) << "step " << step;
  for (int32_t s = 0; s < got.n_seqs; ++s) {
    for (int32_t g = 0; g < got.n_kv_heads; ++g) {
      const auto a = got.Positions(s, g), b = want.Positions(s, rank * got.n_kv_heads + g);
      ASSERT_EQ(std::vector<int32_t>(a.begin(), a.end()), std::vector<int32_t>(b.begin(), b.end()))
          << "rank " << rank << " step " << step << " sequence " << s << " KV head " << g;
    }
  }
}

}  // namespace specontext::testing
