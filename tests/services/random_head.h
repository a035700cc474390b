// A retrieval head with fresh random weights shaped for stories260K (tests only).
#pragma once

#include <filesystem>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "core/sparse/retrieval_head.h"

namespace specontext::testing {

inline ModelConfig Stories260KConfig() {
  ModelConfig m;
  m.vocab_size = 512;
  m.hidden_size = 64;
  m.intermediate_size = 172;
  m.num_hidden_layers = 5;
  m.num_attention_heads = 8;
  m.num_key_value_heads = 4;
  m.head_dim = 8;
  m.max_position_embeddings = 512;
  m.rms_norm_eps = 1e-5;
  m.rope_theta = 10000;
  return m;
}

inline Tensor RandomF32(std::mt19937& rng, Shape shape) {
  Tensor t = Tensor::HostEmpty(DType::kF32, shape);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = u(rng);
  return t;
}

// A layer-kind head with random weights: 8 query heads over 4 KV heads of 8 dims, hidden 48.
inline std::string WriteRandomHead(std::mt19937& rng) {
  RetrievalHeadConfig c;
  c.kind = RetrievalHeadKind::kLayer;
  c.attn = Stories260KConfig();
  c.attn.hidden_size = 48;
  c.attn.num_hidden_layers = 1;
  c.target = {"stories260K", 512, 64, 5, 4, 8};
  const std::string dir = "/tmp/spc_retriever_head_" + std::to_string(rng());
  std::filesystem::create_directories(dir);
  absl::Status st = SaveRetrievalHead(dir, c,
                                      {{"embed_tokens.weight", RandomF32(rng, {512, 48})},
                                       {"input_layernorm.weight", RandomF32(rng, {48})},
                                       {"q_proj.weight", RandomF32(rng, {64, 48})},
                                       {"k_proj.weight", RandomF32(rng, {32, 48})}});
  EXPECT_TRUE(st.ok()) << st;
  return dir;
}

}  // namespace specontext::testing
