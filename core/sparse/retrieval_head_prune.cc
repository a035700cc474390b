// PruneToRetrievalHead: DLM checkpoint -> retrieval head directory (see retrieval_head.h).
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/io/safetensors.h"
#include "core/sparse/retrieval_head.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;
using Named = std::vector<std::pair<std::string, Tensor>>;

absl::Status Take(const WeightSource& ws, const std::string& from, const std::string& to, bool required, Named* out) {
  if (!ws.Has(from)) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("prune: the source checkpoint has no tensor ", from));
  }
  ASSIGN_OR_RETURN(Tensor t, ws.Get(from));
  out->emplace_back(to, std::move(t));
  return absl::OkStatus();
}

int64_t CountParams(const WeightSource& ws) {
  int64_t n = 0;
  for (const std::string& name : ws.Names()) {
    absl::StatusOr<Tensor> t = ws.Get(name);
    if (t.ok()) n += t->numel();
  }
  return n;
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenWeights(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<WeightSource>> one = OpenSafetensors(dir + "/model.safetensors");
  if (one.ok() || one.status().code() != absl::StatusCode::kNotFound) return one;
  return OpenSafetensorsIndex(dir + "/model.safetensors.index.json");
}

}  // namespace

absl::StatusOr<PruneReport> PruneToRetrievalHead(const std::string& source_dir, RetrievalHeadKind kind,
                                                 const ModelConfig& target, const std::string& target_name,
                                                 const std::string& out_dir, const RopeScaling* rope_scaling) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(source_dir + "/config.json", 1 << 20));
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source_dir, "/config.json: ", e.what()));
  }
  if (!root.is_object()) return absl::InvalidArgumentError(absl::StrCat(source_dir, "/config.json: not an object"));
  RetrievalHeadConfig hc;
  hc.kind = kind;
  hc.target = {target_name, target.vocab_size, target.hidden_size, target.num_hidden_layers,
               target.num_key_value_heads, target.head_dim};
  if (kind == RetrievalHeadKind::kEagle3) {
    // EAGLE-3 drafts name their architecture LlamaForCausalLMEagle3; their attention is Llama's.
    root["architectures"] = {"LlamaForCausalLM"};
    root["model_type"] = "llama";
    if (!root.contains("num_hidden_layers")) root["num_hidden_layers"] = 1;
    if (!root.contains("vocab_size")) root["vocab_size"] = target.vocab_size;
    hc.fusion_layers = DefaultFusionLayers(target.num_hidden_layers);
    if (root.contains("eagle_config") && root["eagle_config"].is_object() &&
        root["eagle_config"].contains("eagle_aux_hidden_state_layer_ids")) {
      hc.fusion_layers.clear();
      for (const json& v : root["eagle_config"]["eagle_aux_hidden_state_layer_ids"]) {
        if (!v.is_number_integer()) return absl::InvalidArgumentError("prune: bad eagle_aux_hidden_state_layer_ids");
        hc.fusion_layers.push_back(v.get<int64_t>());
      }
    }
    hc.own_embedding = false;  // EAGLE-3 drafts reuse the target's (frozen) embedding
  }
  absl::StatusOr<ModelConfig> attn = ParseModelConfig(root.dump());
  if (!attn.ok()) return absl::Status(attn.status().code(), absl::StrCat(source_dir, ": ", attn.status().message()));
  hc.attn = *attn;
  hc.attn.num_hidden_layers = 1;
  if (rope_scaling != nullptr) {
    hc.attn.rope_scaling = *rope_scaling;
    if (hc.attn.max_position_embeddings < target.max_position_embeddings) {
      hc.attn.max_position_embeddings = target.max_position_embeddings;
    }
  }
  if (kind == RetrievalHeadKind::kEagle3) hc.attn.vocab_size = target.vocab_size;
  RETURN_IF_ERROR(ValidateHeadForTarget(hc, target));

  ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> ws, OpenWeights(source_dir));
  PruneReport report;
  report.parameters_before = CountParams(*ws);
  hc.source_parameters = report.parameters_before;
  Named out;
  if (kind == RetrievalHeadKind::kEagle3) {
    RETURN_IF_ERROR(Take(*ws, "fc.weight", "fc.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, "midlayer.hidden_norm.weight", "hidden_norm.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, "midlayer.input_layernorm.weight", "input_layernorm.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, "midlayer.self_attn.q_proj.weight", "q_proj.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, "midlayer.self_attn.k_proj.weight", "k_proj.weight", true, &out));
  } else {
    const std::string l0 = "model.layers.0.";
    RETURN_IF_ERROR(Take(*ws, "model.embed_tokens.weight", "embed_tokens.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "input_layernorm.weight", "input_layernorm.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.q_proj.weight", "q_proj.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.k_proj.weight", "k_proj.weight", true, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.q_proj.bias", "q_proj.bias", hc.attn.attention_bias, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.k_proj.bias", "k_proj.bias", hc.attn.attention_bias, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.q_norm.weight", "q_norm.weight", hc.attn.qk_norm, &out));
    RETURN_IF_ERROR(Take(*ws, l0 + "self_attn.k_norm.weight", "k_norm.weight", hc.attn.qk_norm, &out));
  }
  for (const auto& [name, t] : out) report.parameters_after += t.numel();
  RETURN_IF_ERROR(SaveRetrievalHead(out_dir, hc, out));
  return report;
}

}  // namespace specontext
