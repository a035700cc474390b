// An in-memory checkpoint with random weights for tests of the model code (no files involved).
#pragma once

#include <map>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/io/weight_source.h"

namespace specontext::testing {

class MapWeightSource : public WeightSource {
 public:
  bool Has(std::string_view name) const override { return tensors_.count(std::string(name)) > 0; }
  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    auto it = tensors_.find(std::string(name));
    if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("no tensor ", std::string(name)));
    return it->second;
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> out;
    for (const auto& [k, v] : tensors_) out.push_back(k);
    return out;
  }
  void Add(const std::string& name, Shape shape, std::mt19937& rng, float scale, float offset = 0) {
    Tensor t = Tensor::HostEmpty(DType::kF32, shape);
    std::normal_distribution<float> dist(0.0f, scale);
    for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = offset + dist(rng);
    tensors_[name] = t;
  }

 private:
  std::map<std::string, Tensor> tensors_;
};

inline ModelConfig TinyConfig(Architecture arch = Architecture::kLlama, int64_t kv_heads = 2) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 97;
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.head_dim = 12;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.attention_bias = arch == Architecture::kQwen2;
  c.qk_norm = arch == Architecture::kQwen3;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

inline Checkpoint RandomCheckpoint(const ModelConfig& c, uint32_t seed) {
  auto w = std::make_unique<MapWeightSource>();
  std::mt19937 rng(seed);
  const int64_t d = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), f = c.intermediate_size;
  w->Add("model.embed_tokens.weight", {c.vocab_size, d}, rng, 1.0f);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto n = [l](const char* s) { return absl::StrCat("model.layers.", l, ".", s); };
    w->Add(n("input_layernorm.weight"), {d}, rng, 0.1f, 1.0f);
    w->Add(n("post_attention_layernorm.weight"), {d}, rng, 0.1f, 1.0f);
    w->Add(n("self_attn.q_proj.weight"), {q, d}, rng, 0.2f);
    w->Add(n("self_attn.k_proj.weight"), {kv, d}, rng, 0.2f);
    w->Add(n("self_attn.v_proj.weight"), {kv, d}, rng, 0.2f);
    w->Add(n("self_attn.o_proj.weight"), {d, q}, rng, 0.2f);
    w->Add(n("mlp.gate_proj.weight"), {f, d}, rng, 0.2f);
    w->Add(n("mlp.up_proj.weight"), {f, d}, rng, 0.2f);
    w->Add(n("mlp.down_proj.weight"), {d, f}, rng, 0.2f);
    if (c.attention_bias) {
      w->Add(n("self_attn.q_proj.bias"), {q}, rng, 0.1f);
      w->Add(n("self_attn.k_proj.bias"), {kv}, rng, 0.1f);
      w->Add(n("self_attn.v_proj.bias"), {kv}, rng, 0.1f);
    }
    if (c.o_proj_bias) w->Add(n("self_attn.o_proj.bias"), {d}, rng, 0.1f);
    if (c.mlp_bias) {
      w->Add(n("mlp.gate_proj.bias"), {f}, rng, 0.1f);
      w->Add(n("mlp.up_proj.bias"), {f}, rng, 0.1f);
      w->Add(n("mlp.down_proj.bias"), {d}, rng, 0.1f);
    }
    if (c.qk_norm) {
      w->Add(n("self_attn.q_norm.weight"), {c.head_dim}, rng, 0.1f, 1.0f);
      w->Add(n("self_attn.k_norm.weight"), {c.head_dim}, rng, 0.1f, 1.0f);
    }
  }
  w->Add("model.norm.weight", {d}, rng, 0.1f, 1.0f);
  if (!c.tie_word_embeddings) w->Add("lm_head.weight", {c.vocab_size, d}, rng, 0.5f);
  Checkpoint ck;
  ck.config = c;
  ck.weights = std::move(w);
  return ck;
}

}  // namespace specontext::testing
