// Reader of llama2.c legacy checkpoints (Karpathy's `run.c` format, float32).
//
// Layout: 7 int32 header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}
// (vocab_size < 0 means an unshared classifier follows), then float32 arrays:
// token_embedding[V,dim], rms_att[L,dim], wq[L,dim,dim], wk[L,kv_dim,dim], wv[L,kv_dim,dim],
// wo[L,dim,dim], rms_ffn[L,dim], w1[L,hidden,dim], w2[L,dim,hidden], w3[L,hidden,dim], rms_final[dim],
// two legacy RoPE tables [seq_len, head_dim/2] (ignored), and wcls[V,dim] when unshared.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "core/io/weight_source.h"

namespace specontext {

/// The 7-int header of a llama2.c checkpoint.
struct Llama2cHeader {
  int32_t dim = 0;
  int32_t hidden_dim = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t vocab_size = 0;  // negative: unshared classifier
  int32_t seq_len = 0;
};

/// Validates a header and returns the exact file size in bytes it implies.
absl::StatusOr<uint64_t> Llama2cExpectedFileSize(const Llama2cHeader& h);

/// Maps a llama2.c .bin file and exposes its weights under HF Llama names (w1 = gate_proj,
/// w3 = up_proj, w2 = down_proj; lm_head.weight only when unshared). The config is kLlama with
/// rope_interleaved = true, rms_norm_eps 1e-5, rope_theta 10000, bos 1, eos 2,
/// max_position_embeddings = seq_len, tie_word_embeddings = (vocab > 0), torch_dtype float32.
absl::StatusOr<Checkpoint> OpenLlama2cCheckpoint(const std::string& path);

}  // namespace specontext
