// GGUF tensors under HF names: views of F32/F16/BF16 data, f32 dequantization of the
// block-quantized types, and the q/k row permutation of llama.cpp's converter undone for the llama
// architecture.
#include <algorithm>
#include <cstring>
#include <functional>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "core/io/ggml_dequantize.h"
#include "core/io/gguf_checkpoint.h"
#include "core/parallel/cpu_limits.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

struct NameMap {
  const char* gguf;
  const char* hf;
};
// llama.cpp's tensor names (gguf-py tensor_mapping.py / constants.py TENSOR_NAMES) for llama,
// qwen2, qwen3.
constexpr NameMap kGlobalNames[] = {{"token_embd.weight", "model.embed_tokens.weight"},
                                    {"output_norm.weight", "model.norm.weight"},
                                    {"output.weight", "lm_head.weight"}};
constexpr NameMap kLayerNames[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"attn_output.bias", "self_attn.o_proj.bias"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
    {"ffn_gate.bias", "mlp.gate_proj.bias"},
    {"ffn_up.bias", "mlp.up_proj.bias"},
    {"ffn_down.bias", "mlp.down_proj.bias"},
};

struct MappedName {
  std::string hf;      // "" when unmapped
  int64_t layer = -1;  // block index, -1 for global tensors
};

MappedName MapName(std::string_view g) {
  for (const NameMap& m : kGlobalNames) {
    if (g == m.gguf) return {m.hf, -1};
  }
  if (g.substr(0, 4) != "blk.") return {};
  const size_t dot = g.find('.', 4);
  const std::string_view digits = g.substr(4, dot == std::string_view::npos ? 0 : dot - 4);
  // A plain decimal block index: no sign, no leading zero, at most 6 digits (so two spellings of
  // one index cannot both map to the same HF name).
  if (digits.empty() || digits.size() > 6 || (digits.size() > 1 && digits[0] == '0')) return {};
  int64_t layer = 0;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return {};
    layer = layer * 10 + (ch - '0');
  }
  const std::string_view suffix = g.substr(dot + 1);
  for (const NameMap& m : kLayerNames) {
    if (suffix == m.gguf) return {absl::StrCat("model.layers.", layer, ".", m.hf), layer};
  }
  return {};
}

// llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) wrote the q/k rows of head h as
// reshape(n_head, 2, head_dim / 2, ...).swapaxes(1, 2): HF row (h, j, i) with j < 2, i < head_dim /
// 2 became GGUF row h * head_dim + 2 i + j. Returns the GGUF row holding HF row r.
int64_t GgufRowOfHfRow(int64_t r, int64_t head_dim) {
  const int64_t half = head_dim / 2, h = r / head_dim, k = r % head_dim;
  return h * head_dim + 2 * (k % half) + k / half;
}

// Runs fn over [0, n) split into contiguous ranges, on several threads when the work is large.
absl::Status ParallelRanges(int64_t n, int64_t bytes,
                            const std::function<absl::Status(int64_t, int64_t)>& fn) {
  const int64_t hw = DefaultCpuThreads();  // a 2-CPU pod on a 64-core node: 2
  const int64_t threads =
      std::min<int64_t>({hw, 16, n, std::max<int64_t>(1, bytes >> 22)});  // >= 4 MiB each
  if (threads <= 1) return fn(0, n);
  std::vector<absl::Status> status(threads);
  std::vector<std::thread> pool;
  for (int64_t k = 0; k < threads; ++k) {
    pool.emplace_back([&, k] { status[k] = fn(n * k / threads, n * (k + 1) / threads); });
  }
  for (std::thread& t : pool) t.join();
  for (const absl::Status& s : status) RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

bool IsPlainFloat(GgmlType t) {
  return t == GgmlType::kF32 || t == GgmlType::kF16 || t == GgmlType::kBF16;
}

class GgufWeightSource final : public WeightSource {
 public:
  struct Entry {
    std::string hf_name;
    const GgufTensorInfo* info;
    int64_t permute_heads =
        0;  // > 0: undo the converter's q/k row permutation over this many heads
  };

  GgufWeightSource(std::shared_ptr<const GgufFile> file, std::vector<Entry> entries)
      : file_(std::move(file)), entries_(std::move(entries)) {
    for (size_t k = 0; k < entries_.size(); ++k) by_name_.emplace(entries_[k].hf_name, k);
  }

  bool Has(std::string_view name) const override { return by_name_.count(std::string(name)) > 0; }

  std::vector<std::string> Names() const override {
    std::vector<std::string> names;
    for (const Entry& e : entries_) names.push_back(e.hf_name);
    return names;
  }

  absl::StatusOr<WeightInfo> Info(std::string_view name) const override {
    ASSIGN_OR_RETURN(const Entry* e, Find(name));
    const GgufTensorInfo& t = *e->info;
    if (!CanDequantizeGgml(t.type)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", e->hf_name, "\" (GGUF \"", t.name, "\") has ggml type ",
                       GgmlTypeName(t.type),
                       ", which the engine cannot load (supported: F32, F16, BF16, Q4_0, Q4_1, "
                       "Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, "
                       "Q4_K, Q5_K, Q6_K)"));
    }
    WeightInfo w;
    w.dtype = t.type == GgmlType::kF16    ? DType::kF16
              : t.type == GgmlType::kBF16 ? DType::kBF16
                                          : DType::kF32;
    for (uint32_t d = t.n_dims; d-- > 0;)
      w.shape.push_back(t.ne[d]);  // ggml's ne[0] is HF's last dim
    w.stored_bytes = t.nbytes;
    return w;
  }

  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    ASSIGN_OR_RETURN(const Entry* e, Find(name));
    ASSIGN_OR_RETURN(WeightInfo w, Info(name));
    const GgufTensorInfo& t = *e->info;
    const uint8_t* src = file_->TensorData(t);
    const size_t elem = DTypeSize(w.dtype);
    if (IsPlainFloat(t.type) && e->permute_heads == 0 &&
        reinterpret_cast<uintptr_t>(src) % elem == 0) {
      // const_cast: Tensor has no const view type; the mapping is PROT_READ, so writes would fault.
      return Tensor(const_cast<uint8_t*>(src), w.dtype, w.shape, DeviceKind::kCpu, file_->storage);
    }
    Tensor out = Tensor::HostEmpty(w.dtype, w.shape);
    if (t.numel() == 0) return out;
    // Units that move as a whole: rows of ne[0] elements; a permuted 1-D tensor (a bias) moves
    // element-wise.
    const GgmlTypeTraits traits = *GgmlTypeTraitsOf(t.type);
    const bool by_element = e->permute_heads > 0 && t.n_dims <= 1;
    if (by_element && traits.block_size != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", t.name, "\": a quantized 1-D q/k tensor cannot be un-permuted"));
    }
    const int64_t unit_elems = by_element ? 1 : t.ne[0];
    const int64_t units = t.numel() / unit_elems;
    const uint64_t unit_bytes =
        static_cast<uint64_t>(unit_elems) / traits.block_size * traits.type_size;
    int64_t head_dim = 0;
    if (e->permute_heads > 0) {
      head_dim = units / e->permute_heads;
      if (units % e->permute_heads != 0 || head_dim % 2 != 0) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": ", units,
                                                       " rows do not split into ", e->permute_heads,
                                                       " heads of an even size"));
      }
    }
    auto* dst = static_cast<uint8_t*>(out.data());
    const bool plain = IsPlainFloat(t.type);
    RETURN_IF_ERROR(
        ParallelRanges(units, static_cast<int64_t>(out.nbytes()), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t g = head_dim > 0 ? GgufRowOfHfRow(r, head_dim) : r;
            const uint8_t* s = src + static_cast<uint64_t>(g) * unit_bytes;
            uint8_t* d = dst + static_cast<uint64_t>(r) * unit_elems * elem;
            if (plain) {
              std::memcpy(d, s, unit_bytes);
            } else {
              RETURN_IF_ERROR(
                  DequantizeGgml(t.type, s, unit_bytes, unit_elems, reinterpret_cast<float*>(d)));
            }
          }
          return absl::OkStatus();
        }));
    return out;
  }

 private:
  absl::StatusOr<const Entry*> Find(std::string_view name) const {
    auto it = by_name_.find(std::string(name));
    if (it == by_name_.end())
      return absl::NotFoundError(absl::StrCat("tensor \"", std::string(name), "\" not found"));
    return &entries_[it->second];
  }

  std::shared_ptr<const GgufFile> file_;
  std::vector<Entry> entries_;  // file order
  std::unordered_map<std::string, size_t> by_name_;
};

}  // namespace

std::string HfTensorName(std::string_view gguf_name) { return MapName(gguf_name).hf; }

absl::StatusOr<std::unique_ptr<WeightSource>> GgufWeights(std::shared_ptr<const GgufFile> file,
                                                          const ModelConfig& config) {
  std::vector<GgufWeightSource::Entry> entries;
  for (const GgufTensorInfo& t : file->tensors) {
    MappedName m = MapName(t.name);
    if (m.hf.empty() || m.layer >= config.num_hidden_layers) continue;  // extra tensors are ignored
    GgufWeightSource::Entry e{std::move(m.hf), &t, 0};
    if (config.arch ==
        Architecture::kLlama) {  // qwen2/qwen3 use NeoX RoPE in llama.cpp: not permuted
      const std::string_view n = t.name;
      if (n.ends_with(".attn_q.weight") || n.ends_with(".attn_q.bias"))
        e.permute_heads = config.num_attention_heads;
      if (n.ends_with(".attn_k.weight") || n.ends_with(".attn_k.bias"))
        e.permute_heads = config.num_key_value_heads;
    }
    entries.push_back(std::move(e));
  }
  return std::unique_ptr<WeightSource>(new GgufWeightSource(std::move(file), std::move(entries)));
}

}  // namespace specontext
