#include "core/sparse/retrieval_head_config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("retrieval head config.json: ", msg));
}

absl::StatusOr<int64_t> PositiveInt(const json& obj, const char* key) {
  if (!obj.contains(key) || !obj[key].is_number_integer() || obj[key].get<int64_t>() <= 0) {
    return Bad(absl::StrCat("\"", key, "\" must be a positive integer"));
  }
  return obj[key].get<int64_t>();
}

}  // namespace

std::vector<int64_t> DefaultFusionLayers(int64_t n) {
  std::vector<int64_t> layers = {2, n / 2, n - 3};
  for (int64_t& l : layers) l = std::clamp<int64_t>(l, 0, std::max<int64_t>(0, n - 1));  // toy targets: L < 6
  return layers;
}

absl::StatusOr<RetrievalHeadConfig> ParseRetrievalHeadConfig(const std::string& text) {
  RetrievalHeadConfig c;
  ASSIGN_OR_RETURN(c.attn, ParseModelConfig(text));
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    return Bad(e.what());
  }
  if (!root.contains("specontext_retrieval_head") || !root["specontext_retrieval_head"].is_object()) {
    return Bad("no \"specontext_retrieval_head\" object (is this a model config rather than a retrieval head?)");
  }
  const json& h = root["specontext_retrieval_head"];
  if (!h.contains("format_version") || !h["format_version"].is_number_integer() ||
      h["format_version"].get<int64_t>() < RetrievalHeadConfig::kFormatVersion ||
      h["format_version"].get<int64_t>() > RetrievalHeadConfig::kMaxFormatVersion) {
    return Bad(absl::StrCat("unsupported \"format_version\" (this build reads versions ",
                            RetrievalHeadConfig::kFormatVersion, " to ", RetrievalHeadConfig::kMaxFormatVersion, ")"));
  }
  const std::string kind = h.value("kind", std::string());
  if (kind == "eagle3") {
    c.kind = RetrievalHeadKind::kEagle3;
  } else if (kind == "layer") {
    c.kind = RetrievalHeadKind::kLayer;
  } else {
    return Bad(absl::StrCat("\"kind\" must be \"eagle3\" or \"layer\", got \"", kind, "\""));
  }
  const std::string emb = h.value("embedding", std::string("own"));
  if (emb != "own" && emb != "target") return Bad(absl::StrCat("\"embedding\" must be \"own\" or \"target\", got \"", emb, "\""));
  c.own_embedding = emb == "own";
  if (!h.contains("target") || !h["target"].is_object()) return Bad("missing \"target\" object");
  const json& t = h["target"];
  c.target.name = t.value("name", std::string());
  ASSIGN_OR_RETURN(c.target.vocab_size, PositiveInt(t, "vocab_size"));
  ASSIGN_OR_RETURN(c.target.hidden_size, PositiveInt(t, "hidden_size"));
  ASSIGN_OR_RETURN(c.target.num_hidden_layers, PositiveInt(t, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.target.num_key_value_heads, PositiveInt(t, "num_key_value_heads"));
  ASSIGN_OR_RETURN(c.target.head_dim, PositiveInt(t, "head_dim"));
  if (h.contains("source_parameters") && h["source_parameters"].is_number_integer()) {
    c.source_parameters = h["source_parameters"].get<int64_t>();
  }
  if (c.kind == RetrievalHeadKind::kEagle3) {
    if (!h.contains("fusion_layers") || !h["fusion_layers"].is_array() || h["fusion_layers"].size() != 3) {
      return Bad("eagle3 heads need \"fusion_layers\": three target layer ids");
    }
    for (const json& v : h["fusion_layers"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0) return Bad("\"fusion_layers\" must be non-negative integers");
      c.fusion_layers.push_back(v.get<int64_t>());
    }
    const std::string norm = h.value("fc_input_norm", std::string("none"));
    if (norm == "per_layer") {
      c.fused_norm = FusedNorm::kPerLayer;
    } else if (norm == "whole") {
      c.fused_norm = FusedNorm::kWhole;
    } else if (norm != "none") {
      return Bad(absl::StrCat("\"fc_input_norm\" must be \"none\", \"per_layer\" or \"whole\", got \"", norm, "\""));
    }
    if (h.contains("fc_bias") && !h["fc_bias"].is_boolean()) return Bad("\"fc_bias\" must be true or false");
    c.fc_bias = h.value("fc_bias", false);
  }
  return c;
}

std::string RetrievalHeadConfigToJson(const RetrievalHeadConfig& c) {
  json root = json::parse(ModelConfigToJson(c.attn));
  json h = json::object();
  h["format_version"] = c.format_version();
  h["kind"] = c.kind == RetrievalHeadKind::kEagle3 ? "eagle3" : "layer";
  h["embedding"] = c.own_embedding ? "own" : "target";
  if (c.kind == RetrievalHeadKind::kEagle3) {
    h["fusion_layers"] = c.fusion_layers;
    if (c.fused_norm != FusedNorm::kNone) h["fc_input_norm"] = c.fused_norm == FusedNorm::kPerLayer ? "per_layer" : "whole";
    if (c.fc_bias) h["fc_bias"] = true;
  }
  h["target"] = {{"name", c.target.name},
                 {"vocab_size", c.target.vocab_size},
                 {"hidden_size", c.target.hidden_size},
                 {"num_hidden_layers", c.target.num_hidden_layers},
                 {"num_key_value_heads", c.target.num_key_value_heads},
                 {"head_dim", c.target.head_dim}};
  h["source_parameters"] = c.source_parameters;
  root["specontext_retrieval_head"] = h;
  return root.dump(2);
}

absl::Status ValidateHeadForTarget(const RetrievalHeadConfig& h, const ModelConfig& m) {
  auto mismatch = [](const std::string& what, int64_t head, int64_t model) {
    return absl::FailedPreconditionError(absl::StrCat("retrieval head does not fit the model: ", what, " is ", head,
                                                      " in the head but ", model, " in the model"));
  };
  if (h.attn.vocab_size != m.vocab_size) return mismatch("vocab_size", h.attn.vocab_size, m.vocab_size);
  if (h.target.vocab_size != m.vocab_size) return mismatch("target vocab_size", h.target.vocab_size, m.vocab_size);
  if (h.target.hidden_size != m.hidden_size) return mismatch("target hidden_size", h.target.hidden_size, m.hidden_size);
  if (h.target.num_hidden_layers != m.num_hidden_layers) {
    return mismatch("target num_hidden_layers", h.target.num_hidden_layers, m.num_hidden_layers);
  }
  if (h.target.num_key_value_heads != m.num_key_value_heads) {
    return mismatch("target num_key_value_heads", h.target.num_key_value_heads, m.num_key_value_heads);
  }
  if (h.target.head_dim != m.head_dim) return mismatch("target head_dim", h.target.head_dim, m.head_dim);
  // Head-level selection emits one set per KV head of the model, so the head scores per model KV head.
  if (h.attn.num_key_value_heads != m.num_key_value_heads) {
    return mismatch("num_key_value_heads", h.attn.num_key_value_heads, m.num_key_value_heads);
  }
  if (!h.own_embedding && h.attn.hidden_size != m.hidden_size) {
    return mismatch("hidden_size (the target's embedding is shared)", h.attn.hidden_size, m.hidden_size);
  }
  for (int64_t l : h.fusion_layers) {
    if (l >= m.num_hidden_layers) {
      return absl::FailedPreconditionError(absl::StrCat("retrieval head does not fit the model: fusion layer ", l,
                                                        " >= the model's ", m.num_hidden_layers, " layers"));
    }
  }
  return absl::OkStatus();
}

}  // namespace specontext
