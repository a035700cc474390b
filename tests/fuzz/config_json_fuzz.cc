// Fuzzes config.json and generation_config.json parsing. Invariant: any accepted config serialises
// (ModelConfigToJson) to text that parses back to the same shape.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/io/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace specontext;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)ParseGenerationConfig(text);
  absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
  if (!c.ok()) return 0;
  absl::StatusOr<ModelConfig> again = ParseModelConfig(ModelConfigToJson(*c));
  if (!again.ok()) std::abort();
  if (again->arch != c->arch || again->hidden_size != c->hidden_size || again->head_dim != c->head_dim ||
      again->num_key_value_heads != c->num_key_value_heads || again->qk_norm != c->qk_norm ||
      again->attention_bias != c->attention_bias || again->rope_scaling.type != c->rope_scaling.type ||
      again->eos_token_ids != c->eos_token_ids) {
    std::abort();
  }
  return 0;
}
