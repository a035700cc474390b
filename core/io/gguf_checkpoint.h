// GGUF files (llama.cpp's models) as Checkpoints: the HF-style config, generation defaults,
// tokenizer and weights under their HF names and in HF layout, so the engine runs a .gguf like an
// HF directory.
//
// Architectures: "llama" (Llama 2/3/3.1/3.2, SmolLM, DeepSeek-R1-Distill-Llama), "qwen2" and
// "qwen3". Metadata keys are llama.cpp's (gguf-py constants.py, Keys.LLM/Attention/Rope/Tokenizer).
// Weights: tensor names map to HF names (blk.N.attn_q.weight ->
// model.layers.N.self_attn.q_proj.weight), ggml dims (ne[0] innermost) reverse into HF shapes,
// F32/F16/BF16 tensors are views of the mapping and quantized tensors (Q4_0 ... Q6_K) dequantize to
// f32 on each Get. For "llama", llama.cpp's converter stored q_proj/k_proj rows permuted for its
// interleaved RoPE; Get undoes that so the rows are HF's.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/io/gguf.h"
#include "core/io/gguf_vocab.h"
#include "core/io/model_config.h"
#include "core/io/weight_source.h"

namespace specontext {

/// Opens a GGUF file: config from its metadata, generation defaults (greedy; BOS/EOS of the vocab),
/// the tokenizer as embedded tokenizer.json texts (empty, with a warning in the log, when the
/// vocabulary cannot be converted) and the weights. Errors are prefixed with the path.
/// OpenCheckpoint calls this for files that start with the GGUF magic and validates the weights'
/// shapes afterwards.
absl::StatusOr<Checkpoint> OpenGgufCheckpoint(const std::string& path);

/// The ModelConfig of a parsed GGUF file. Unimplemented naming the architecture when it is not
/// llama, qwen2 or qwen3 (or uses a feature the engine lacks: partial rotary, per-layer head
/// counts, LongRoPE); InvalidArgument naming the key for missing or inconsistent metadata.
absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& file);

/// The tokenizer.ggml.* and tokenizer.chat_template keys. NotFound when the file has no token list.
absl::StatusOr<GgufVocab> GgufVocabFromMetadata(const GgufFile& file);

/// The weights of `file` under HF names, for the model `config` describes (GgufModelConfig of the
/// file).
absl::StatusOr<std::unique_ptr<WeightSource>> GgufWeights(std::shared_ptr<const GgufFile> file,
                                                          const ModelConfig& config);

/// The HF name of a GGUF tensor name ("blk.3.ffn_down.weight" ->
/// "model.layers.3.mlp.down_proj.weight"), or "" for names the engine does not use
/// (rope_freqs.weight, unknown tensors).
std::string HfTensorName(std::string_view gguf_name);

}  // namespace specontext
