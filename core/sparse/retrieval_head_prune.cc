// PruneToRetrievalHead: DLM checkpoint -> retrieval head directory (retrieval_head_prune.h).
#include "core/sparse/retrieval_head_prune.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/io/file_util.h"
#include "core/io/weight_files.h"
#include "core/rope/rope_frequencies.h"
#include "core/sparse/retrieval_head.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

using Named = std::vector<std::pair<std::string, Tensor>>;

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("prune: ", msg));
}

// Tensor `from` of `ws`, checked against the shape the source config implies, as `to` in the head.
absl::StatusOr<Tensor> Checked(const WeightSource& ws, const std::string& from,
                               const Shape& shape) {
  if (!ws.Has(from)) {
    return Bad(absl::StrCat("the source checkpoint has no tensor ", from, " (expected ",
                            ShapeToString(shape), ")"));
  }
  ASSIGN_OR_RETURN(Tensor t, ws.Get(from));
  if (t.shape() != shape) {
    return Bad(absl::StrCat("tensor ", from, " has shape ", ShapeToString(t.shape()),
                            " but the source config implies ", ShapeToString(shape)));
  }
  if (!IsFloating(t.dtype())) {
    return Bad(absl::StrCat("tensor ", from, " has dtype ", std::string(DTypeName(t.dtype())),
                            "; the head computes with f32, f16 or bf16 weights"));
  }
  return t;
}

absl::Status Take(const WeightSource& ws, const std::string& from, const std::string& to,
                  const Shape& shape, Named* out) {
  ASSIGN_OR_RETURN(Tensor t, Checked(ws, from, shape));
  out->emplace_back(to, std::move(t));
  return absl::OkStatus();
}

// Parameters: floating tensors only (d2t/t2d and other integer or bool buffers are not parameters).
int64_t CountParams(const WeightSource& ws) {
  int64_t n = 0;
  for (const std::string& name : ws.Names()) {
    absl::StatusOr<Tensor> t = ws.Get(name);
    if (t.ok() && IsFloating(t->dtype())) n += t->numel();
  }
  return n;
}

// [n] tensors -> one [k·n] tensor, in their common dtype (f32 when they differ).
Tensor Concat(const std::vector<Tensor>& parts) {
  DType dtype = parts[0].dtype();
  int64_t total = 0;
  for (const Tensor& p : parts) {
    if (p.dtype() != dtype) dtype = DType::kF32;
    total += p.numel();
  }
  Tensor out = Tensor::HostEmpty(dtype, {total});
  auto* dst = static_cast<uint8_t*>(out.data());
  std::vector<float> tmp;
  for (const Tensor& p : parts) {
    if (p.dtype() == dtype) {
      std::memcpy(dst, p.data(), p.nbytes());
    } else {
      tmp.resize(p.numel());
      ConvertToF32(p.data(), p.dtype(), tmp.data(), p.numel());
      std::memcpy(dst, tmp.data(), tmp.size() * sizeof(float));
    }
    dst += p.numel() * DTypeSize(dtype);
  }
  return out;
}

std::string DescribeRope(const ModelConfig& a) {
  const RopeScaling& r = a.rope_scaling;
  std::string s = absl::StrFormat("RoPE: theta %g, ", a.rope_theta);
  if (r.type.empty()) return s + "no scaling";
  if (r.type == "yarn") {
    return s +
           absl::StrFormat(
               "YaRN factor %g from %d positions (beta_fast %g, beta_slow %g, attention factor %s)",
               r.factor, r.original_max_position_embeddings, r.beta_fast, r.beta_slow,
               r.attention_factor > 0 ? absl::StrFormat("%g", r.attention_factor)
                                      : std::string("0.1 ln(factor) + 1"));
  }
  return s + absl::StrFormat("%s scaling, factor %g", r.type, r.factor);
}

// The head's RoPE: the publisher's (in `attn` on entry) with the caller's replacements.
absl::Status ChooseRope(const PruneOptions& o, int64_t trained, const ModelConfig& target,
                        ModelConfig* attn, std::vector<std::string>* notes) {
  if (o.rope_theta) {
    if (!(*o.rope_theta > 0)) return Bad("--rope-theta must be > 0");
    attn->rope_theta = *o.rope_theta;
    notes->push_back(absl::StrFormat("rope_theta %g (--rope-theta)", *o.rope_theta));
  }
  const bool yarn_detail =
      o.original_max_position || o.yarn_beta_fast || o.yarn_beta_slow || o.yarn_attention_factor;
  if (o.rope_scaling) {
    attn->rope_scaling = *o.rope_scaling;
  } else if (o.yarn_factor || o.yarn_auto) {
    const int64_t original = o.original_max_position.value_or(trained);
    if (original <= 0) return Bad("--original-max-position must be > 0");
    const double factor = o.yarn_auto ? static_cast<double>(target.max_position_embeddings) /
                                            static_cast<double>(original)
                                      : *o.yarn_factor;
    if (factor == 0 || (o.yarn_auto && factor <= 1)) {
      attn->rope_scaling = RopeScaling();
    } else if (!(factor > 1)) {
      return Bad(absl::StrFormat("--yarn-factor must be 0 (no scaling) or > 1, got %g", factor));
    } else {
      RopeScaling y;
      y.type = "yarn";
      y.factor = factor;
      y.original_max_position_embeddings = original;
      y.beta_fast = o.yarn_beta_fast.value_or(32.0);
      y.beta_slow = o.yarn_beta_slow.value_or(1.0);
      y.attention_factor = o.yarn_attention_factor.value_or(0.0);
      if (!(y.beta_fast > y.beta_slow && y.beta_slow > 0) || y.attention_factor < 0) {
        return Bad("YaRN needs beta_fast > beta_slow > 0 and a non-negative attention factor");
      }
      attn->rope_scaling = y;
    }
  } else if (yarn_detail) {
    return Bad(
        "--original-max-position and --yarn-beta-*/--yarn-attention-factor need --yarn-factor");
  }
  if (!attn->rope_scaling.type.empty()) {
    attn->max_position_embeddings =
        std::max(attn->max_position_embeddings, target.max_position_embeddings);
  }
  RETURN_IF_ERROR(ComputeRopeFrequencies(*attn).status());
  notes->push_back(DescribeRope(*attn));
  if (attn->rope_scaling.type.empty() && target.max_position_embeddings > trained) {
    notes->push_back(
        absl::StrCat("the source was trained at ", trained, " positions and the target serves ",
                     target.max_position_embeddings, ": --yarn-factor auto stretches it with YaRN ",
                     "(as the SpeContext paper does)"));
  }
  return absl::OkStatus();
}

absl::Status PruneEagle3(const std::string& source_dir, const ModelConfig& target,
                         const PruneOptions& o, RetrievalHeadConfig* hc, Named* out,
                         PruneReport* report) {
  const DraftPublisher* forced = o.publisher ? &*o.publisher : nullptr;
  ASSIGN_OR_RETURN(Eagle3Draft d, OpenEagle3Draft(source_dir, target, forced));
  report->source =
      absl::StrCat("EAGLE-3 draft, ", std::string(DraftPublisherName(d.publisher)), " layout",
                   d.publisher_detected ? "" : " (--publisher)", ", ", d.weights_file);
  report->parameters_before = CountParams(*d.weights);
  hc->attn = d.attn;
  hc->attn.vocab_size = target.vocab_size;
  hc->own_embedding = false;  // EAGLE-3 drafts use the target's (frozen) embedding
  hc->fused_norm = d.fused_norm;
  hc->fc_bias = !d.names.fc_bias.empty();
  if (o.fusion_layers) {
    hc->fusion_layers = *o.fusion_layers;
    report->notes.push_back(absl::StrCat("fusion layers [", absl::StrJoin(hc->fusion_layers, ", "),
                                         "] (--fusion-layers; the draft says: ", d.fusion_note,
                                         ")"));
    if (hc->fusion_layers.size() != 3) return Bad("--fusion-layers needs three layer ids");
  } else {
    hc->fusion_layers = d.fusion_layers;
    report->notes.push_back(absl::StrCat("fusion layers [", absl::StrJoin(hc->fusion_layers, ", "),
                                         "]: ", d.fusion_note));
  }
  report->notes.push_back(d.rope_note);
  RETURN_IF_ERROR(ChooseRope(o, d.trained_positions, target, &hc->attn, &report->notes));
  RETURN_IF_ERROR(ValidateHeadForTarget(*hc, target));

  const WeightSource& ws = *d.weights;
  const Eagle3DraftNames& n = d.names;
  const ModelConfig& a = hc->attn;
  const int64_t h = a.hidden_size, th = target.hidden_size, hd = a.head_dim;
  RETURN_IF_ERROR(Take(ws, n.fc, "fc.weight", {h, 3 * th}, out));
  if (hc->fc_bias) RETURN_IF_ERROR(Take(ws, n.fc_bias, "fc.bias", {h}, out));
  if (d.fused_norm != FusedNorm::kNone) {
    const bool per_layer = d.fused_norm == FusedNorm::kPerLayer;
    std::vector<Tensor> parts;
    for (const std::string& name : n.fused_norm) {
      ASSIGN_OR_RETURN(Tensor t, Checked(ws, name, {per_layer ? th : 3 * th}));
      parts.push_back(std::move(t));
    }
    out->emplace_back("fc_norm.weight", Concat(parts));
    report->notes.push_back(
        per_layer ? "fc_norm (EAGLE-3.1): each fused layer RMS-normalised before fc"
                  : "norm_before_fc: the fused features RMS-normalised together before fc");
  }
  RETURN_IF_ERROR(Take(ws, n.hidden_norm, "hidden_norm.weight", {h}, out));
  RETURN_IF_ERROR(Take(ws, n.input_layernorm, "input_layernorm.weight", {h}, out));
  RETURN_IF_ERROR(Take(ws, n.q_proj, "q_proj.weight", {a.num_attention_heads * hd, 2 * h}, out));
  RETURN_IF_ERROR(Take(ws, n.k_proj, "k_proj.weight", {a.num_key_value_heads * hd, 2 * h}, out));
  if (a.attention_bias) {
    RETURN_IF_ERROR(Take(ws, n.q_bias, "q_proj.bias", {a.num_attention_heads * hd}, out));
    RETURN_IF_ERROR(Take(ws, n.k_bias, "k_proj.bias", {a.num_key_value_heads * hd}, out));
  }
  if (a.qk_norm) {
    RETURN_IF_ERROR(Take(ws, n.q_norm, "q_norm.weight", {hd}, out));
    RETURN_IF_ERROR(Take(ws, n.k_norm, "k_norm.weight", {hd}, out));
  }
  if (d.draft_layers > 1) {
    report->notes.push_back(
        absl::StrCat("the draft has ", d.draft_layers,
                     " layers; the head keeps the first (it reads embedding and fused features)"));
  }
  report->notes.push_back(
      absl::StrCat("attention: ", a.model_type, a.qk_norm ? " with q/k norms" : "",
                   a.attention_bias ? " with q/k biases" : "", ", ", a.num_attention_heads, " q / ",
                   a.num_key_value_heads, " kv heads of ", hd,
                   "; not kept: v/o projections, MLP, LM head, d2t/t2d, embedding"));
  return absl::OkStatus();
}

absl::Status PruneLayer(const std::string& source_dir, const ModelConfig& target,
                        const PruneOptions& o, RetrievalHeadConfig* hc, Named* out,
                        PruneReport* report) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(source_dir + "/config.json", 1 << 20));
  absl::StatusOr<ModelConfig> attn = ParseModelConfig(text);
  if (!attn.ok())
    return absl::Status(attn.status().code(),
                        absl::StrCat(source_dir, ": ", attn.status().message()));
  ASSIGN_OR_RETURN(WeightFiles files, OpenWeightFiles(source_dir));
  report->source = absl::StrCat("first layer of ", attn->model_type, " model, ", files.file);
  report->parameters_before = CountParams(*files.weights);
  hc->attn = *attn;
  hc->attn.num_hidden_layers = 1;
  RETURN_IF_ERROR(ChooseRope(o, attn->max_position_embeddings, target, &hc->attn, &report->notes));
  RETURN_IF_ERROR(ValidateHeadForTarget(*hc, target));
  const WeightSource& ws = *files.weights;
  const ModelConfig& a = hc->attn;
  const std::string l0 = "model.layers.0.";
  const int64_t hd = a.head_dim;
  RETURN_IF_ERROR(Take(ws, "model.embed_tokens.weight", "embed_tokens.weight",
                       {a.vocab_size, a.hidden_size}, out));
  RETURN_IF_ERROR(
      Take(ws, l0 + "input_layernorm.weight", "input_layernorm.weight", {a.hidden_size}, out));
  RETURN_IF_ERROR(
      Take(ws, l0 + "self_attn.q_proj.weight", "q_proj.weight", {a.q_dim(), a.hidden_size}, out));
  RETURN_IF_ERROR(
      Take(ws, l0 + "self_attn.k_proj.weight", "k_proj.weight", {a.kv_dim(), a.hidden_size}, out));
  if (a.attention_bias) {
    RETURN_IF_ERROR(Take(ws, l0 + "self_attn.q_proj.bias", "q_proj.bias", {a.q_dim()}, out));
    RETURN_IF_ERROR(Take(ws, l0 + "self_attn.k_proj.bias", "k_proj.bias", {a.kv_dim()}, out));
  }
  if (a.qk_norm) {
    RETURN_IF_ERROR(Take(ws, l0 + "self_attn.q_norm.weight", "q_norm.weight", {hd}, out));
    RETURN_IF_ERROR(Take(ws, l0 + "self_attn.k_norm.weight", "k_norm.weight", {hd}, out));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PruneReport> PruneToRetrievalHead(const std::string& source_dir,
                                                 RetrievalHeadKind kind, const ModelConfig& target,
                                                 const std::string& target_name,
                                                 const std::string& out_dir,
                                                 const PruneOptions& options) {
  RetrievalHeadConfig hc;
  hc.kind = kind;
  hc.target = {target_name,
               target.vocab_size,
               target.hidden_size,
               target.num_hidden_layers,
               target.num_key_value_heads,
               target.head_dim};
  Named out;
  PruneReport report;
  if (kind == RetrievalHeadKind::kEagle3) {
    RETURN_IF_ERROR(PruneEagle3(source_dir, target, options, &hc, &out, &report));
  } else {
    if (options.fusion_layers || options.publisher)
      return Bad("--fusion-layers and --publisher are for eagle3 drafts");
    RETURN_IF_ERROR(PruneLayer(source_dir, target, options, &hc, &out, &report));
  }
  hc.source_parameters = report.parameters_before;
  for (const auto& [name, t] : out) report.parameters_after += t.numel();
  RETURN_IF_ERROR(SaveRetrievalHead(out_dir, hc, out));
  return report;
}

}  // namespace specontext
