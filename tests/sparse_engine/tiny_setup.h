// Shared setup of the sparse engine tests: a tiny random checkpoint written with the random-checkpoint
// library, a `layer` retrieval head pruned from it, and a model loaded on a fresh CPU backend.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/model/engine.h"
#include "core/model/sparse_decoder.h"
#include "core/model/transformer.h"
#include "core/sparse/retrieval_head.h"
#include "core/status_macros.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext::testing {

// The preset has 3 layers, 8 query heads over 2 KV heads (GQA) and head_dim 8.
inline constexpr char kPreset[] = "tiny-llama-tied-gqa";

// Removes every TestDir of this process when it exits (checkpoints are shared by the tests of one process,
// so they cannot go with one test).
inline void RemoveTestDirsAtExit() {
  static const bool registered = [] {
    std::atexit([] {
      const std::string prefix = absl::StrCat("spc_se_", getpid(), "_");
      std::error_code ec;
      for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec)) {
        if (e.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove_all(e.path(), ec);
      }
    });
    return true;
  }();
  (void)registered;
}

inline std::string TestDir(const std::string& name) {
  RemoveTestDirsAtExit();
  return (std::filesystem::temp_directory_path() / absl::StrCat("spc_se_", getpid(), "_", name)).string();
}

// Writes (once per process and seed) the checkpoint and its pruned `layer` head; returns {model, head} dirs.
inline absl::StatusOr<std::pair<std::string, std::string>> TinyFiles(uint64_t seed) {
  const std::string model = TestDir(absl::StrCat("model", seed)), head = TestDir(absl::StrCat("head", seed));
  if (!std::filesystem::exists(head + "/config.json")) {
    ASSIGN_OR_RETURN(ModelConfig c, RandomCheckpointPreset(kPreset));
    RandomCheckpointOptions o;
    o.dtype = DType::kF32;
    o.seed = seed;
    o.num_threads = 2;
    RETURN_IF_ERROR(WriteRandomCheckpoint(c, model, o));
    RETURN_IF_ERROR(PruneToRetrievalHead(model, RetrievalHeadKind::kLayer, c, kPreset, head).status());
  }
  return std::make_pair(model, head);
}

struct Tiny {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<RetrievalHead> head;
};

inline absl::StatusOr<std::unique_ptr<Tiny>> LoadTiny(uint64_t seed = 7, int64_t memory_limit = 0) {
  ASSIGN_OR_RETURN(auto files, TinyFiles(seed));
  auto t = std::make_unique<Tiny>();
  ASSIGN_OR_RETURN(t->checkpoint, OpenCheckpoint(files.first));
  t->backend = MakeCpuBackend(memory_limit);
  ASSIGN_OR_RETURN(t->model, Transformer::Load(t->checkpoint, t->backend.get()));
  ASSIGN_OR_RETURN(t->head, RetrievalHead::Load(files.second, t->checkpoint.config, t->checkpoint.weights.get()));
  return t;
}

// The greedy tokens `engine` generates after `prompt` (past EOS), at `budget` (0: the decoder's own).
inline std::vector<int32_t> Greedy(Engine& engine, const std::vector<int32_t>& prompt, int n,
                                   int32_t budget = 0) {
  GenerationRequest r;
  r.prompt = prompt;
  r.max_new_tokens = n;
  r.ignore_eos = true;
  r.budget = budget;
  auto res = engine.Generate(r);
  EXPECT_TRUE(res.ok()) << res.status();
  return res.ok() ? res->tokens : std::vector<int32_t>{};
}

inline std::vector<int32_t> RandomPrompt(int n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(3, static_cast<int32_t>(vocab) - 1);
  std::vector<int32_t> p(n);
  for (int32_t& t : p) t = d(rng);
  return p;
}

// A normal f32 tensor of `scale` around `offset`.
inline Tensor RandomF32(std::mt19937& rng, Shape shape, float scale, float offset = 0) {
  Tensor t = Tensor::HostEmpty(DType::kF32, std::move(shape));
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = offset + d(rng);
  return t;
}

// An EAGLE-3 head sharing the target's embedding (own_embedding = false), written directly in the head
// format with random weights: norms near 1, fc, q/k projections of 4 query heads of dim 8 with the target's
// KV heads, fc and q/k weights of standard deviations `fc_scale` and `qk_scale` (larger: sharper attention).
inline std::string WriteRandomEagle3Head(const ModelConfig& target, uint32_t seed, const std::string& dir_name,
                                         float fc_scale = 0.1f, float qk_scale = 0.2f) {
  std::mt19937 rng(seed);
  RetrievalHeadConfig c;
  c.kind = RetrievalHeadKind::kEagle3;
  c.attn = target;
  c.attn.num_hidden_layers = 1;
  c.attn.num_attention_heads = 4;
  c.attn.head_dim = 8;
  c.own_embedding = false;
  c.fusion_layers = DefaultFusionLayers(target.num_hidden_layers);
  c.target = {"tiny", target.vocab_size, target.hidden_size, target.num_hidden_layers, target.num_key_value_heads,
              target.head_dim};
  const int64_t h = target.hidden_size;
  const std::string dir = TestDir(dir_name);
  absl::Status st = SaveRetrievalHead(
      dir, c,
      {{"input_layernorm.weight", RandomF32(rng, {h}, 0.1f, 1.0f)},
       {"hidden_norm.weight", RandomF32(rng, {h}, 0.1f, 1.0f)},
       {"fc.weight", RandomF32(rng, {h, 3 * h}, fc_scale)},
       {"q_proj.weight", RandomF32(rng, {c.attn.num_attention_heads * 8, 2 * h}, qk_scale)},
       {"k_proj.weight", RandomF32(rng, {c.attn.num_key_value_heads * 8, 2 * h}, qk_scale)}});
  return st.ok() ? dir : std::string();
}

}  // namespace specontext::testing
