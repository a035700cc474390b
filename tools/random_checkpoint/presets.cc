// Preset shapes. The large ones copy the published config.json of each model.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

ModelConfig Base(Architecture arch, int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads,
                 int64_t kv_heads, int64_t head_dim) {
  ModelConfig c;
  c.arch = arch;
  c.model_type = arch == Architecture::kLlama ? "llama" : arch == Architecture::kQwen2 ? "qwen2" : "qwen3";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.torch_dtype = "bfloat16";
  c.qk_norm = arch == Architecture::kQwen3;
  c.attention_bias = arch == Architecture::kQwen2;
  return c;
}

RopeScaling Llama3Scaling(double factor, int64_t original) {
  RopeScaling r;
  r.type = "llama3";
  r.factor = factor;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position_embeddings = original;
  return r;
}

ModelConfig Llama31_8B() {
  ModelConfig c = Base(Architecture::kLlama, 128256, 4096, 14336, 32, 32, 8, 128);
  c.max_position_embeddings = 131072;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling = Llama3Scaling(8.0, 8192);
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001};
  return c;
}

// Tiny models: vocab well above 256 bytes + specials, shapes odd enough to catch layout mistakes.
ModelConfig Tiny(Architecture arch, int64_t vocab, int64_t layers, int64_t heads, int64_t kv, int64_t head_dim) {
  ModelConfig c = Base(arch, vocab, 64, 160, layers, heads, kv, head_dim);
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = arch == Architecture::kLlama ? 1e-5 : 1e-6;
  c.rope_theta = arch == Architecture::kLlama ? 10000.0 : 1000000.0;
  c.bos_token_id = vocab - 2;
  c.eos_token_ids = {vocab - 1};
  return c;
}

}  // namespace

std::vector<std::string> RandomCheckpointPresetNames() {
  return {"llama-3.1-8b", "llama-3.2-1b",       "qwen3-8b",   "deepseek-r1-distill-llama-8b",
          "tiny-llama",   "tiny-llama-tied-gqa", "tiny-qwen2", "tiny-qwen3",
          "tiny-mqa",     "tiny-llama-bias"};
}

absl::StatusOr<ModelConfig> RandomCheckpointPreset(std::string_view name) {
  if (name == "llama-3.1-8b" || name == "deepseek-r1-distill-llama-8b") return Llama31_8B();
  if (name == "llama-3.2-1b") {
    ModelConfig c = Base(Architecture::kLlama, 128256, 2048, 8192, 16, 32, 8, 64);
    c.max_position_embeddings = 131072;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 500000.0;
    c.rope_scaling = Llama3Scaling(32.0, 8192);
    c.tie_word_embeddings = true;
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
    return c;
  }
  if (name == "qwen3-8b") {
    ModelConfig c = Base(Architecture::kQwen3, 151936, 4096, 12288, 36, 32, 8, 128);
    c.max_position_embeddings = 40960;
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 1000000.0;
    c.bos_token_id = 151643;
    c.eos_token_ids = {151645};
    return c;
  }
  if (name == "tiny-llama") return Tiny(Architecture::kLlama, 384, 2, 4, 4, 16);
  if (name == "tiny-llama-tied-gqa") {
    ModelConfig c = Tiny(Architecture::kLlama, 512, 3, 8, 2, 8);
    c.tie_word_embeddings = true;
    c.rope_theta = 500000.0;
    c.max_position_embeddings = 4096;
    c.rope_scaling = Llama3Scaling(8.0, 256);
    return c;
  }
  if (name == "tiny-qwen2") {
    ModelConfig c = Tiny(Architecture::kQwen2, 448, 2, 4, 2, 16);
    c.tie_word_embeddings = true;
    return c;
  }
  if (name == "tiny-qwen3") return Tiny(Architecture::kQwen3, 400, 2, 4, 2, 32);  // q_dim 128 != hidden 64
  if (name == "tiny-mqa") return Tiny(Architecture::kLlama, 320, 2, 4, 1, 16);
  if (name == "tiny-llama-bias") {  // attention_bias (q/k/v/o) and mlp_bias, as some Llama fine-tunes set
    ModelConfig c = Tiny(Architecture::kLlama, 352, 2, 4, 2, 16);
    c.attention_bias = true;
    c.o_proj_bias = true;
    c.mlp_bias = true;
    return c;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown preset \"", std::string(name), "\" (known: ",
                                                 absl::StrJoin(RandomCheckpointPresetNames(), ", "), ")"));
}

std::vector<SpecialToken> DefaultSpecialTokens(const ModelConfig& c) {
  std::vector<SpecialToken> out;
  const bool qwen = c.arch != Architecture::kLlama;
  if (c.bos_token_id >= 0) out.push_back({c.bos_token_id, qwen ? "<|endoftext|>" : "<|begin_of_text|>"});
  for (size_t i = 0; i < c.eos_token_ids.size(); ++i) {
    const int64_t id = c.eos_token_ids[i];
    if (id == c.bos_token_id) continue;
    std::string name = qwen ? "<|im_end|>" : "<|end_of_text|>";
    if (i > 0) name = absl::StrCat("<|eos_", i, "|>");
    out.push_back({id, name});
  }
  return out;
}

}  // namespace specontext
