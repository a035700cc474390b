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

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool Has(std::string_view name) const = 0;
  // A host view of the tensor in its stored dtype (often memory-mapped); keeps its file alive.
  // NotFound if absent.
  virtual absl::StatusOr<Tensor> Get(std::string_view name) const = 0;
  virtual std::vector<std::string> Names() const = 0;
};

// A loaded checkpoint: its configuration and its weights.
struct Checkpoint {
  ModelConfig config;
  GenerationDefaults generation;
  std::unique_ptr<WeightSource> weights;
  std::string tokenizer_path;  // tokenizer.json beside the weights, or "" when absent
};

// Opens an HF directory (config.json, model.safetensors or model.safetensors.index.json,
// optional generation_config.json and tokenizer.json) or a llama2.c .bin file.
// Checks that every tensor the architecture needs exists with the shape config.json implies.
absl::StatusOr<Checkpoint> OpenCheckpoint(const std::string& path);

}  // namespace specontext
