#include "core/io/llama2c.h"

#include <cstring>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status Bad(const std::string& msg) { return absl::InvalidArgumentError(absl::StrCat("llama2.c checkpoint: ", msg)); }

// Named views at fixed float offsets of the mapping.
class Llama2cWeights final : public WeightSource {
 public:
  struct View {
    uint64_t float_offset;
    Shape shape;
  };
  Llama2cWeights(MappedFile file, std::vector<std::pair<std::string, View>> views)
      : file_(std::move(file)), order_(std::move(views)) {
    for (size_t i = 0; i < order_.size(); ++i) by_name_.emplace(order_[i].first, i);
  }
  bool Has(std::string_view name) const override { return by_name_.count(std::string(name)) > 0; }
  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    auto it = by_name_.find(std::string(name));
    if (it == by_name_.end()) return absl::NotFoundError(absl::StrCat("tensor \"", std::string(name), "\" not found"));
    const View& v = order_[it->second].second;
    auto* p = const_cast<uint8_t*>(file_.data + 28 + v.float_offset * 4);  // read-only mapping
    return Tensor(p, DType::kF32, v.shape, DeviceKind::kCpu, file_.storage);
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> n;
    for (const auto& p : order_) n.push_back(p.first);
    return n;
  }

 private:
  MappedFile file_;
  std::vector<std::pair<std::string, View>> order_;
  std::unordered_map<std::string, size_t> by_name_;
};

}  // namespace

absl::StatusOr<uint64_t> Llama2cExpectedFileSize(const Llama2cHeader& h) {
  // Bounds keep every product below 2^63 and reject garbage headers early.
  if (h.dim <= 0 || h.hidden_dim <= 0 || h.n_layers <= 0 || h.n_heads <= 0 || h.n_kv_heads <= 0 ||
      h.vocab_size == 0 || h.seq_len <= 0) {
    return Bad(absl::StrCat("header fields must be positive: dim=", h.dim, " hidden_dim=", h.hidden_dim,
                            " n_layers=", h.n_layers, " n_heads=", h.n_heads, " n_kv_heads=", h.n_kv_heads,
                            " vocab_size=", h.vocab_size, " seq_len=", h.seq_len));
  }
  if (h.dim > 65536 || h.hidden_dim > 262144 || h.n_layers > 1024 || h.n_heads > 1024 ||
      h.vocab_size > 4000000 || h.vocab_size < -4000000 || h.seq_len > 1 << 22) {
    return Bad("header values are implausibly large (not a llama2.c checkpoint?)");
  }
  if (h.n_heads % h.n_kv_heads != 0 || h.n_kv_heads > h.n_heads) {
    return Bad(absl::StrCat("n_heads ", h.n_heads, " is not a multiple of n_kv_heads ", h.n_kv_heads));
  }
  if (h.dim % h.n_heads != 0 || (h.dim / h.n_heads) % 2 != 0) {
    return Bad(absl::StrCat("dim ", h.dim, " / n_heads ", h.n_heads, " must give an even head size"));
  }
  const uint64_t d = h.dim, hid = h.hidden_dim, L = h.n_layers, V = h.vocab_size < 0 ? -int64_t{h.vocab_size} : h.vocab_size;
  const uint64_t head = d / h.n_heads, kv = head * h.n_kv_heads;
  uint64_t floats = V * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * hid * d + d +
                    static_cast<uint64_t>(h.seq_len) * head;  // two tables of seq_len*head/2
  if (h.vocab_size < 0) floats += V * d;
  return 28 + floats * 4;
}

absl::StatusOr<Checkpoint> OpenLlama2cCheckpoint(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mf, MapFileReadOnly(path));
  auto with_path = [&](const absl::Status& s) { return absl::Status(s.code(), absl::StrCat(path, ": ", s.message())); };
  if (mf.size < 28) return with_path(Bad(absl::StrCat("file is ", mf.size, " bytes, shorter than the 28-byte header")));
  Llama2cHeader h;
  int32_t f[7];
  std::memcpy(f, mf.data, 28);  // little-endian hosts only, like llama2.c itself
  h = {f[0], f[1], f[2], f[3], f[4], f[5], f[6]};
  absl::StatusOr<uint64_t> expected = Llama2cExpectedFileSize(h);
  if (!expected.ok()) return with_path(expected.status());
  if (*expected != mf.size) {
    return with_path(Bad(absl::StrCat("file is ", mf.size, " bytes but the header (dim ", h.dim, ", layers ",
                                      h.n_layers, ", vocab ", h.vocab_size, ") implies exactly ", *expected,
                                      " (truncated or not llama2.c?)")));
  }
  const bool shared = h.vocab_size > 0;
  const int64_t d = h.dim, hid = h.hidden_dim, L = h.n_layers, V = shared ? h.vocab_size : -int64_t{h.vocab_size};
  const int64_t head = d / h.n_heads, kv = head * h.n_kv_heads;

  std::vector<std::pair<std::string, Llama2cWeights::View>> views;
  uint64_t off = 0;
  auto add = [&](std::string name, Shape shape) {
    views.push_back({std::move(name), {off, shape}});
    off += static_cast<uint64_t>(NumElements(shape));
  };
  // Per-layer arrays are stored [L, ...] contiguously: emit one view per layer.
  auto per_layer = [&](const char* suffix, Shape shape) {
    for (int64_t l = 0; l < L; ++l) add(absl::StrCat("model.layers.", l, ".", suffix), shape);
  };
  add("model.embed_tokens.weight", {V, d});
  per_layer("input_layernorm.weight", {d});
  per_layer("self_attn.q_proj.weight", {d, d});
  per_layer("self_attn.k_proj.weight", {kv, d});
  per_layer("self_attn.v_proj.weight", {kv, d});
  per_layer("self_attn.o_proj.weight", {d, d});
  per_layer("post_attention_layernorm.weight", {d});
  per_layer("mlp.gate_proj.weight", {hid, d});
  per_layer("mlp.down_proj.weight", {d, hid});
  per_layer("mlp.up_proj.weight", {hid, d});
  add("model.norm.weight", {d});
  off += static_cast<uint64_t>(h.seq_len) * head;  // legacy freq_cis_real / freq_cis_imag
  if (!shared) add("lm_head.weight", {V, d});

  Checkpoint ckpt;
  ModelConfig& c = ckpt.config;
  c.arch = Architecture::kLlama;
  c.model_type = "llama";
  c.vocab_size = V;
  c.hidden_size = d;
  c.intermediate_size = hid;
  c.num_hidden_layers = L;
  c.num_attention_heads = h.n_heads;
  c.num_key_value_heads = h.n_kv_heads;
  c.head_dim = head;
  c.max_position_embeddings = h.seq_len;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = shared;
  c.rope_interleaved = true;
  c.torch_dtype = "float32";
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  ckpt.generation.bos_token_id = 1;
  ckpt.generation.eos_token_ids = {2};
  ckpt.weights = std::make_unique<Llama2cWeights>(std::move(mf), std::move(views));
  return ckpt;
}

}  // namespace specontext
