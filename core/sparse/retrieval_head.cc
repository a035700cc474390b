#include "core/sparse/retrieval_head.h"

#include <cblas.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/io/safetensors.h"
#include "core/rope/rope_frequencies.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// The tensor `name` of `ws` with exactly `shape`, converted to f32.
absl::Status GetF32(const WeightSource& ws, const std::string& name, const Shape& shape, std::vector<float>* out,
                    int64_t* params) {
  if (!ws.Has(name)) return absl::InvalidArgumentError(absl::StrCat("retrieval head: missing tensor ", name));
  ASSIGN_OR_RETURN(Tensor t, ws.Get(name));
  if (t.shape() != shape || !IsFloating(t.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: tensor ", name, " is ", t.DebugString(),
                                                   ", expected floating ", ShapeToString(shape)));
  }
  out->resize(t.numel());
  ConvertToF32(t.data(), t.dtype(), out->data(), t.numel());
  *params += t.numel();
  return absl::OkStatus();
}

// y[n, m] = x[n, k] · W[m, k]ᵀ (+ b[m]).
void Linear(const float* x, int64_t n, int64_t k, const std::vector<float>& w, int64_t m,
            const std::vector<float>& b, float* y) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, 1.0f, x, k, w.data(), k, 0.0f, y, m);
  if (!b.empty()) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) y[i * m + j] += b[j];
    }
  }
}

void RmsNorm(const float* x, const float* w, int64_t d, double eps, float* out) {
  double ss = 0;
  for (int64_t e = 0; e < d; ++e) ss += static_cast<double>(x[e]) * x[e];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
  for (int64_t e = 0; e < d; ++e) out[e] = x[e] * inv * w[e];
}

}  // namespace

RetrievalKvCache::RetrievalKvCache(int64_t n_kv, int64_t hd, int64_t cap)
    : n_kv_(n_kv), hd_(hd), k_(Tensor::HostEmpty(DType::kF32, {n_kv, std::max<int64_t>(1, cap), hd})) {}

void RetrievalKvCache::Append(const float* k_row) {
  const int64_t cap = k_.dim(1);
  if (len_ == cap) {
    Tensor bigger = Tensor::HostEmpty(DType::kF32, {n_kv_, 2 * cap, hd_});
    for (int64_t g = 0; g < n_kv_; ++g) {
      std::memcpy(bigger.as<float>() + g * 2 * cap * hd_, k_.as<float>() + g * cap * hd_, len_ * hd_ * sizeof(float));
    }
    k_ = std::move(bigger);
  }
  const int64_t c = k_.dim(1);
  for (int64_t g = 0; g < n_kv_; ++g) {
    std::memcpy(k_.as<float>() + (g * c + len_) * hd_, k_row + g * hd_, hd_ * sizeof(float));
  }
  ++len_;
}

int64_t RetrievalHead::fused_width() const {
  return config_.kind == RetrievalHeadKind::kEagle3 ? 3 * config_.target.hidden_size : 0;
}

absl::StatusOr<std::unique_ptr<RetrievalHead>> RetrievalHead::Create(const RetrievalHeadConfig& config,
                                                                     const WeightSource& ws,
                                                                     const ModelConfig& target,
                                                                     const WeightSource* target_weights) {
  RETURN_IF_ERROR(ValidateHeadForTarget(config, target));
  std::unique_ptr<RetrievalHead> h(new RetrievalHead());
  h->config_ = config;
  const ModelConfig& a = config.attn;
  const int64_t hidden = a.hidden_size, in = config.proj_in(), hd = a.head_dim;
  // Embedding: a view in its stored dtype (the target's table is not copied).
  const WeightSource* emb_src = config.own_embedding ? &ws : target_weights;
  const std::string emb_name = config.own_embedding ? "embed_tokens.weight" : "model.embed_tokens.weight";
  if (emb_src == nullptr || !emb_src->Has(emb_name)) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: missing embedding ", emb_name,
                                                   config.own_embedding ? "" : " in the target's weights"));
  }
  ASSIGN_OR_RETURN(h->embed_, emb_src->Get(emb_name));
  if (h->embed_.shape() != Shape{a.vocab_size, hidden} || !IsFloating(h->embed_.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: embedding ", emb_name, " is ",
                                                   h->embed_.DebugString(), ", expected [", a.vocab_size, ", ", hidden, "]"));
  }
  if (config.own_embedding) h->params_ += h->embed_.numel();
  int64_t& p = h->params_;
  RETURN_IF_ERROR(GetF32(ws, "input_layernorm.weight", {hidden}, &h->input_norm_, &p));
  RETURN_IF_ERROR(GetF32(ws, "q_proj.weight", {a.num_attention_heads * hd, in}, &h->wq_, &p));
  h->matrix_dtype_ = ws.Get("q_proj.weight")->dtype();
  RETURN_IF_ERROR(GetF32(ws, "k_proj.weight", {a.num_key_value_heads * hd, in}, &h->wk_, &p));
  if (a.attention_bias) {
    RETURN_IF_ERROR(GetF32(ws, "q_proj.bias", {a.num_attention_heads * hd}, &h->bq_, &p));
    RETURN_IF_ERROR(GetF32(ws, "k_proj.bias", {a.num_key_value_heads * hd}, &h->bk_, &p));
  }
  if (a.qk_norm) {
    RETURN_IF_ERROR(GetF32(ws, "q_norm.weight", {hd}, &h->q_norm_, &p));
    RETURN_IF_ERROR(GetF32(ws, "k_norm.weight", {hd}, &h->k_norm_, &p));
  }
  if (config.kind == RetrievalHeadKind::kEagle3) {
    RETURN_IF_ERROR(GetF32(ws, "fc.weight", {hidden, 3 * config.target.hidden_size}, &h->fc_, &p));
    RETURN_IF_ERROR(GetF32(ws, "hidden_norm.weight", {hidden}, &h->hidden_norm_, &p));
    if (config.fc_bias) RETURN_IF_ERROR(GetF32(ws, "fc.bias", {hidden}, &h->fc_bias_, &p));
    if (config.fused_norm != FusedNorm::kNone) {
      RETURN_IF_ERROR(GetF32(ws, "fc_norm.weight", {h->fused_width()}, &h->fc_norm_, &p));
    }
  }
  ASSIGN_OR_RETURN(RopeFrequencies rope, ComputeRopeFrequencies(a));
  h->inv_freq_ = std::move(rope.inv_freq);
  h->attention_scaling_ = rope.attention_scaling;
  return h;
}

absl::StatusOr<std::unique_ptr<RetrievalHead>> RetrievalHead::Load(const std::string& dir, const ModelConfig& target,
                                                                   const WeightSource* target_weights) {
  auto prefixed = [&](const absl::Status& s) { return absl::Status(s.code(), absl::StrCat(dir, ": ", s.message())); };
  absl::StatusOr<RetrievalHeadConfig> config = [&]() -> absl::StatusOr<RetrievalHeadConfig> {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/config.json", 1 << 20));
    return ParseRetrievalHeadConfig(text);
  }();
  if (!config.ok()) return prefixed(config.status());
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensors(dir + "/model.safetensors");
  if (!ws.ok()) return prefixed(ws.status());
  absl::StatusOr<std::unique_ptr<RetrievalHead>> h = Create(*config, **ws, target, target_weights);
  if (!h.ok()) return prefixed(h.status());
  return h;
}

absl::Status RetrievalHead::Forward(const std::vector<int32_t>& ids, const std::vector<int32_t>& positions,
                                    const Tensor& fused, Tensor* q, Tensor* k) const {
  const ModelConfig& a = config_.attn;
  const int64_t n = ids.size(), hidden = a.hidden_size, in = config_.proj_in(), hd = a.head_dim;
  const int64_t nq = a.num_attention_heads, nkv = a.num_key_value_heads;
  if (positions.size() != ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: ", ids.size(), " ids but ", positions.size(), " positions"));
  }
  if (q == nullptr || k == nullptr || q->dtype() != DType::kF32 || k->dtype() != DType::kF32 ||
      q->shape() != Shape{n, nq, hd} || k->shape() != Shape{n, nkv, hd}) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: q/k outputs must be f32 [", n, ", ", nq, "|", nkv,
                                                   ", ", hd, "]"));
  }
  if (config_.kind == RetrievalHeadKind::kEagle3 &&
      (fused.dtype() != DType::kF32 || fused.shape() != Shape{n, fused_width()})) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: eagle3 needs fused hidden states f32 [", n, ", ",
                                                   fused_width(), "], got ", fused.DebugString()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= a.vocab_size || positions[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("retrieval head: token ", ids[i], " at position ", positions[i],
                                                     " outside the vocabulary of ", a.vocab_size));
    }
  }
  // x [n, in]: normalised embedding (and, for eagle3, the normalised fused hidden state after it).
  std::vector<float> x(n * in), row(hidden);
  const size_t esz = DTypeSize(embed_.dtype());
  for (int64_t i = 0; i < n; ++i) {
    ConvertToF32(static_cast<const uint8_t*>(embed_.data()) + ids[i] * hidden * esz, embed_.dtype(), row.data(), hidden);
    RmsNorm(row.data(), input_norm_.data(), hidden, a.rms_norm_eps, x.data() + i * in);
  }
  if (config_.kind == RetrievalHeadKind::kEagle3) {
    const int64_t fw = fused_width();
    const float* h = fused.as<float>();
    std::vector<float> normed;
    if (config_.fused_norm != FusedNorm::kNone) {  // per third (fc_norm) or over the whole row (norm_before_fc)
      const int64_t groups = config_.fused_norm == FusedNorm::kPerLayer ? 3 : 1, w = fw / groups;
      normed.resize(n * fw);
      for (int64_t r = 0; r < n * groups; ++r) {
        RmsNorm(h + r * w, fc_norm_.data() + (r % groups) * w, w, a.rms_norm_eps, normed.data() + r * w);
      }
      h = normed.data();
    }
    std::vector<float> f(n * hidden);
    Linear(h, n, fw, fc_, hidden, fc_bias_, f.data());
    for (int64_t i = 0; i < n; ++i) RmsNorm(f.data() + i * hidden, hidden_norm_.data(), hidden, a.rms_norm_eps, x.data() + i * in + hidden);
  }
  Linear(x.data(), n, in, wq_, nq * hd, bq_, q->as<float>());
  Linear(x.data(), n, in, wk_, nkv * hd, bk_, k->as<float>());
  // Per-head QK norm, then RoPE (HF rotate-half, or llama2.c interleaved pairs).
  const int64_t half = hd / 2;
  std::vector<float> cs(half), sn(half), tmp(hd);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const double ang = static_cast<double>(positions[i]) * inv_freq_[j];
      cs[j] = static_cast<float>(std::cos(ang)) * attention_scaling_;
      sn[j] = static_cast<float>(std::sin(ang)) * attention_scaling_;
    }
    for (int pass = 0; pass < 2; ++pass) {
      const int64_t heads = pass == 0 ? nq : nkv;
      float* base = (pass == 0 ? q : k)->as<float>() + i * heads * hd;
      const std::vector<float>& norm = pass == 0 ? q_norm_ : k_norm_;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = base + h * hd;
        if (!norm.empty()) {
          RmsNorm(v, norm.data(), hd, a.rms_norm_eps, tmp.data());
          std::memcpy(v, tmp.data(), hd * sizeof(float));
        }
        for (int64_t j = 0; j < half; ++j) {
          const int64_t i0 = a.rope_interleaved ? 2 * j : j, i1 = a.rope_interleaved ? 2 * j + 1 : j + half;
          const float x0 = v[i0], x1 = v[i1];
          v[i0] = x0 * cs[j] - x1 * sn[j];
          v[i1] = x1 * cs[j] + x0 * sn[j];
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status RetrievalHead::Observe(const std::vector<int32_t>& ids, const Tensor& fused, RetrievalKvCache* cache,
                                    Tensor* q) const {
  const int64_t n = ids.size();
  std::vector<int32_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = cache->len() + static_cast<int32_t>(i);
  Tensor k = Tensor::HostEmpty(DType::kF32, {n, n_kv_heads(), head_dim()});
  RETURN_IF_ERROR(Forward(ids, pos, fused, q, &k));
  for (int64_t i = 0; i < n; ++i) cache->Append(k.as<float>() + i * n_kv_heads() * head_dim());
  return absl::OkStatus();
}

absl::Status SaveRetrievalHead(const std::string& dir, const RetrievalHeadConfig& config,
                               const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  const std::string text = RetrievalHeadConfigToJson(config);
  {
    std::ofstream f(dir + "/config.json", std::ios::binary | std::ios::trunc);
    f << text;
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  }
  return WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
}

}  // namespace specontext
