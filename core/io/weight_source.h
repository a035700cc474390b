// Named host tensors of a checkpoint, in HF naming ("model.layers.0.self_attn.q_proj.weight").
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/model_config.h"
#include "core/tensor.h"

namespace specontext {

/// What WeightSource::Get returns for a tensor, known without reading its data.
struct WeightInfo {
  DType dtype = DType::kF32;  // the dtype of the tensor Get returns
  Shape shape;
  uint64_t stored_bytes = 0;  // bytes the tensor occupies in the checkpoint (progress accounting)
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool Has(std::string_view name) const = 0;
  // A host tensor: a view in its stored dtype (often memory-mapped; keeps its file alive), or for a
  // quantized GGUF tensor a fresh f32 copy dequantized on each call. NotFound if absent.
  virtual absl::StatusOr<Tensor> Get(std::string_view name) const = 0;
  virtual std::vector<std::string> Names() const = 0;
  // The dtype and shape Get(name) returns and its stored size, without materialising the tensor (a
  // dequantizing source overrides it so that checks do not convert every weight). Default: from Get.
  virtual absl::StatusOr<WeightInfo> Info(std::string_view name) const;
};

// A loaded checkpoint: its configuration and its weights.
struct Checkpoint {
  ModelConfig config;
  GenerationDefaults generation;
  std::unique_ptr<WeightSource> weights;
  std::string tokenizer_path;  // tokenizer.json beside the weights, or "" when absent
                               // (llama2.c: tok<vocab>.bin or tokenizer.bin beside the .bin file)
  // A tokenizer carried inside the model file (GGUF), as the tokenizer.json and tokenizer_config.json
  // texts ParseHfTokenizer reads (the config holds bos/eos, add_bos_token and chat_template).
  // Empty when the tokenizer is a file (tokenizer_path) or absent.
  std::string embedded_tokenizer_json;
  std::string embedded_tokenizer_config_json;
};

// Opens an HF directory (config.json, model.safetensors or model.safetensors.index.json,
// optional generation_config.json and tokenizer.json), a GGUF file (recognised by its magic; see
// gguf_checkpoint.h) or a llama2.c .bin file.
// Checks that every tensor the architecture needs exists with the shape config.json implies.
// A path to a .safetensors or .json file inside an HF directory opens that directory.
absl::StatusOr<Checkpoint> OpenCheckpoint(const std::string& path);

/// "model.layers.<layer>.<suffix>", e.g. LayerTensorName(3, "self_attn.q_proj.weight").
std::string LayerTensorName(int layer, std::string_view suffix);

/// One tensor the architecture needs, with the shape the config implies.
struct ExpectedTensor {
  std::string name;
  Shape shape;
};
/// Every tensor `config` requires, in load order: embed [V,d]; per layer q_proj [q_dim,d],
/// k_proj/v_proj [kv_dim,d], o_proj [d,q_dim], q/k/v biases [q_dim]/[kv_dim] when attention_bias,
/// o_proj bias [d] when o_proj_bias, q_norm/k_norm [head_dim] when qk_norm, input/post_attention
/// layernorms [d], gate/up [I,d], down [d,I] (biases [I]/[I]/[d] when mlp_bias); model.norm [d];
/// lm_head [V,d] unless tie_word_embeddings.
std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& config);

/// Checks that every ExpectedTensors() entry exists in `weights`, has that shape and a floating dtype
/// (through WeightSource::Info: no tensor is read).
/// InvalidArgument naming the tensor, the expected and the actual shape.
absl::Status ValidateWeights(const ModelConfig& config, const WeightSource& weights);

}  // namespace specontext
