// Test helper: GGUF model files written as llama.cpp's converter (convert_hf_to_gguf.py) writes
// them — llama.cpp metadata keys, GGUF tensor names, ggml dims (reversed), and for the llama
// architecture the q/k rows permuted by the converter's permute() — from tensors given in HF naming
// and layout. Written independently of core/io/gguf_weights.cc: the permutation here is the
// converter's forward one.
#pragma once

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/io/ggml_dequantize.h"
#include "core/io/weight_source.h"
#include "tests/io/gguf_writer.h"

namespace specontext::testing {

// One tensor in HF naming: `rows` x `row_bytes` bytes of ggml `type`, rows in HF order.
struct HfGgufTensor {
  std::string hf_name;
  Shape shape;  // HF shape ([out, in] for matrices, [n] for vectors)
  GgmlType type = GgmlType::kF32;
  std::string bytes;

  // What WeightSource::Get must return: f32 for F32 and quantized types, the stored dtype
  // otherwise.
  std::vector<float> Values() const {
    std::vector<float> out(NumElements(shape));
    const absl::Status s =
        DequantizeGgml(type, reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                       static_cast<int64_t>(out.size()), out.data());
    if (!s.ok()) out.clear();
    return out;
  }
};

// The GGUF name of an HF tensor name (llama.cpp's names), "" when it has none.
inline std::string GgufNameOf(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> kLayer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.o_proj.bias", "attn_output.bias"},
      {"mlp.gate_proj.bias", "ffn_gate.bias"},
      {"mlp.up_proj.bias", "ffn_up.bias"},
      {"mlp.down_proj.bias", "ffn_down.bias"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size()),
                    rest = hf.substr(dot + 1);
  for (const auto& [h, g] : kLayer) {
    if (rest == h) return "blk." + layer + "." + g;
  }
  return "";
}

// convert_hf_to_gguf.py's permute(w, n_head, n_head_kv) on whole rows of bytes:
// w.reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2).reshape(w.shape).
inline std::string ConverterPermuteRows(const std::string& bytes, int64_t rows, int64_t n_head) {
  const size_t row_bytes = bytes.size() / rows;
  const int64_t half = rows / n_head / 2;
  std::string out(bytes.size(), '\0');
  int64_t dst_row = 0;
  for (int64_t h = 0; h < n_head; ++h) {  // the swapped array's index order: [h][i][j]
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t src_row = (h * 2 + j) * half + i;  // the reshaped source's [h][j][i]
        out.replace(dst_row++ * row_bytes, row_bytes, bytes, src_row * row_bytes, row_bytes);
      }
    }
  }
  return out;
}

// Metadata of `c` under llama.cpp's keys.
inline void WriteModelMetadata(const ModelConfig& c, GgufWriter& w) {
  const std::string a = c.arch == Architecture::kLlama   ? "llama"
                        : c.arch == Architecture::kQwen2 ? "qwen2"
                                                         : "qwen3";
  w.Str("general.architecture", a).Str("general.name", "test model");
  w.U32(a + ".context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.U32(a + ".embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.U32(a + ".feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.U32(a + ".block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.U32(a + ".attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.U32(a + ".attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  w.U32(a + ".attention.key_length", static_cast<uint32_t>(c.head_dim));
  w.U32(a + ".attention.value_length", static_cast<uint32_t>(c.head_dim));
  w.U32(a + ".rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  w.F32(a + ".rope.freq_base", static_cast<float>(c.rope_theta));
  w.F32(a + ".attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.U32(a + ".vocab_size", static_cast<uint32_t>(c.vocab_size));
  if (c.bos_token_id >= 0)
    w.U32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(c.bos_token_id));
  if (!c.eos_token_ids.empty())
    w.U32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(c.eos_token_ids[0]));
}

// The rope_freqs tensor the converter writes for llama3 RoPE scaling (convert_hf_to_gguf.py,
// LlamaModel.generate_extra_tensors): per frequency 1 (high), factor (low) or the smoothed divisor.
inline std::vector<float> ConverterRopeFactors(const ModelConfig& c) {
  const RopeScaling& r = c.rope_scaling;
  const double low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
  const double high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
  std::vector<float> out;
  for (int64_t i = 0; i < c.head_dim; i += 2) {
    const float freq =
        1.0f / std::pow(static_cast<float>(c.rope_theta), static_cast<float>(i) / c.head_dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      out.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      out.push_back(static_cast<float>(r.factor));
    } else {
      const double smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) /
                            (r.high_freq_factor - r.low_freq_factor);
      out.push_back(static_cast<float>(1 / ((1 - smooth) / r.factor + smooth)));
    }
  }
  return out;
}

// Adds `tensors` to `w` as the converter would for `c` (llama q/k rows permuted, llama3 RoPE
// scaling as a rope_freqs tensor).
inline void WriteModelTensors(const ModelConfig& c, const std::vector<HfGgufTensor>& tensors,
                              GgufWriter& w) {
  if (c.rope_scaling.type == "llama3") {
    w.FloatTensor("rope_freqs.weight", GgmlType::kF32, {c.head_dim / 2}, ConverterRopeFactors(c));
  }
  for (const HfGgufTensor& t : tensors) {
    std::string bytes = t.bytes;
    const int64_t rows = t.shape[0];
    const bool q = t.hf_name.find("q_proj.") != std::string::npos,
               k = t.hf_name.find("k_proj.") != std::string::npos;
    if (c.arch == Architecture::kLlama && (q || k)) {
      bytes = ConverterPermuteRows(bytes, rows, q ? c.num_attention_heads : c.num_key_value_heads);
    }
    std::vector<int64_t> ne(t.shape.rbegin(), t.shape.rend());
    w.Tensor(GgufNameOf(t.hf_name), t.type, ne, bytes);
  }
}

// Random tensors for every tensor `c` needs: matrices in `matrix_type` (random blocks with sane
// scales for quantized types), vectors in F32 (llama.cpp keeps 1-D tensors in F32).
inline std::vector<HfGgufTensor> RandomHfGgufTensors(const ModelConfig& c, GgmlType matrix_type,
                                                     std::mt19937_64& rng) {
  std::vector<HfGgufTensor> out;
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (const ExpectedTensor& e : ExpectedTensors(c)) {
    HfGgufTensor t{e.name, e.shape, e.shape.size() == 2 ? matrix_type : GgmlType::kF32, ""};
    const GgmlTypeTraits tr = *GgmlTypeTraitsOf(t.type);
    const int64_t n = NumElements(e.shape);
    if (tr.block_size > 1) {
      t.bytes = RandomQuantBlocks(t.type, n / tr.block_size, rng);
    } else {
      std::vector<float> v(n);
      for (float& x : v) x = e.shape.size() == 1 ? 1.0f + normal(rng) : normal(rng);
      const DType dt = t.type == GgmlType::kF16    ? DType::kF16
                       : t.type == GgmlType::kBF16 ? DType::kBF16
                                                   : DType::kF32;
      t.bytes.resize(n * DTypeSize(dt));
      ConvertFromF32(v.data(), dt, t.bytes.data(), n);
    }
    out.push_back(std::move(t));
  }
  return out;
}

// The tensors of an opened (HF) checkpoint, as F32.
inline std::vector<HfGgufTensor> HfGgufTensorsOf(const Checkpoint& ckpt) {
  std::vector<HfGgufTensor> out;
  for (const ExpectedTensor& e : ExpectedTensors(ckpt.config)) {
    const Tensor t = ckpt.weights->Get(e.name).value();
    HfGgufTensor g{e.name, e.shape, GgmlType::kF32, std::string(t.numel() * 4, '\0')};
    ConvertToF32(t.data(), t.dtype(), reinterpret_cast<float*>(g.bytes.data()), t.numel());
    out.push_back(std::move(g));
  }
  return out;
}

}  // namespace specontext::testing
