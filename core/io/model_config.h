// Model hyper-parameters from HF config.json / generation_config.json (or a llama2.c header).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

enum class Architecture : uint8_t { kLlama, kQwen2, kQwen3 };
std::string_view ArchitectureName(Architecture arch);

// rope_scaling of config.json. type "" means none.
struct RopeScaling {
  std::string type;  // "", "linear", "llama3", "yarn"
  double factor = 1.0;
  double low_freq_factor = 1.0;                 // llama3
  double high_freq_factor = 4.0;                // llama3
  int64_t original_max_position_embeddings = 0; // llama3, yarn
  double attention_factor = 0.0;                // yarn (0 = derive from factor)
  double beta_fast = 32.0;                      // yarn
  double beta_slow = 1.0;                       // yarn
  // Per-frequency divisors of the inverse frequencies, applied after `type`: [head_dim / 2] or empty.
  // llama.cpp's converter stores Llama 3.1's llama3 scaling as such a list (the rope_freqs tensor of a
  // GGUF file) instead of its parameters. config.json carries it as "specontext_rope_freq_factors".
  std::vector<double> freq_factors;
};

struct ModelConfig {
  Architecture arch = Architecture::kLlama;
  std::string model_type;  // as in config.json ("llama", "qwen2", "qwen3")
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;   // q/k/v projection biases (Qwen2 always; Llama when set)
  bool o_proj_bias = false;      // o_proj bias: HF Llama and Qwen3 give o_proj attention_bias, Qwen2 never
  bool mlp_bias = false;         // gate/up/down biases (Llama's mlp_bias)
  bool qk_norm = false;          // per-head RMSNorm of q and k before RoPE (Qwen3)
  bool rope_interleaved = false; // llama2.c checkpoints rotate (x[2i], x[2i+1]) pairs
  std::string torch_dtype;       // "bfloat16", "float16", "float32" or ""
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// generation_config.json; fields absent in the file keep these defaults.
struct GenerationDefaults {
  bool do_sample = false;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;
  double repetition_penalty = 1.0;  // read so that a load can say it is not applied
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
};

// Parses and validates config.json text. Errors name the offending field.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);
absl::StatusOr<GenerationDefaults> ParseGenerationConfig(std::string_view json_text);
absl::StatusOr<GenerationDefaults> LoadGenerationConfig(const std::string& path);
// Serialises to HF config.json (used by the random-checkpoint tool).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace specontext
