// The shape of stories260K (llama2.c), the smallest real GQA model the tests meet: dim 64, 5 layers, 8 heads
// over 4 KV heads, hidden 172 (divisible by 4, so tensor parallelism up to 4 splits it), vocab 512.
#pragma once

#include "core/io/model_config.h"

namespace specontext {

/// Gives `c` stories260K's sizes, keeping its other fields (dtype, rope, norms) as they are.
inline void SetStories260kShape(ModelConfig& c) {
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_hidden_layers = 5;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 8;
}

}  // namespace specontext
