// Reading EAGLE-3 drafts in each publisher's layout (eagle3_draft.h, which cites the sources).
#include "core/sparse/eagle3_draft.h"

#include <initializer_list>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/file_util.h"
#include "core/io/weight_files.h"
#include "core/sparse/retrieval_head_config.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("eagle3 draft: ", msg));
}

bool Flag(const json& o, const char* key) {
  return o.contains(key) && o[key].is_boolean() && o[key].get<bool>();
}

DraftPublisher Detect(const json& root, const std::string& weights_file) {
  if (root.contains("transformer_layer_config") || root.contains("speculators_config") ||
      root.contains("speculators_model_type")) {
    return DraftPublisher::kSpeculators;
  }
  if (weights_file.rfind("pytorch_model.bin", 0) == 0) return DraftPublisher::kSafeAILab;
  return DraftPublisher::kSpecForge;
}

// The first draft layer's HF config, completed so that ParseModelConfig reads it: the head needs
// the attention dims, eps and RoPE; fields it does not use get harmless values.
absl::StatusOr<json> LayerConfig(const json& root, DraftPublisher p, const ModelConfig& target) {
  json layer = root;
  if (p == DraftPublisher::kSpeculators) {
    if (!root.contains("transformer_layer_config") ||
        !root["transformer_layer_config"].is_object()) {
      return Bad("a speculators config needs a \"transformer_layer_config\" object");
    }
    layer = root["transformer_layer_config"];
  }
  // Drafts name their class (LlamaForCausalLMEagle3, Eagle3Speculator, LlamaForCausalLM): the
  // layer's attention is given by model_type (SpecForge writes "llama" also for Qwen3 targets).
  layer.erase("architectures");
  if (!layer.contains("model_type") || !layer["model_type"].is_string())
    layer["model_type"] = "llama";
  const std::string type = layer["model_type"].get<std::string>();
  if (type != "llama" && type != "qwen2" && type != "qwen3") {
    return Bad(absl::StrCat("the draft layer's model_type \"", type,
                            "\" is not supported (llama, qwen2, qwen3)"));
  }
  for (const char* key : {"hidden_size", "num_attention_heads"}) {
    if (!layer.contains(key)) return Bad(absl::StrCat("the draft config has no \"", key, "\""));
  }
  if (!layer.contains("num_hidden_layers")) layer["num_hidden_layers"] = 1;
  if (!layer.contains("vocab_size")) layer["vocab_size"] = target.vocab_size;
  if (!layer.contains("intermediate_size")) layer["intermediate_size"] = layer["hidden_size"];
  // transformers' to_diff_dict (speculators) drops values equal to the class default: LlamaConfig's
  // max_position_embeddings is 2048, Qwen3Config's 32768.
  if (!layer.contains("max_position_embeddings"))
    layer["max_position_embeddings"] = type == "qwen3" ? 32768 : 2048;
  return layer;
}

absl::Status ResolveFusion(const json& root, DraftPublisher p, const ModelConfig& target,
                           Eagle3Draft* d) {
  const int64_t L = target.num_hidden_layers;
  const json* ids = nullptr;
  if (p == DraftPublisher::kSpeculators && root.contains("eagle_aux_hidden_state_layer_ids") &&
      !root["eagle_aux_hidden_state_layer_ids"].is_null()) {
    ids = &root["eagle_aux_hidden_state_layer_ids"];
  } else if (p == DraftPublisher::kSpecForge && root.contains("eagle_config") &&
             root["eagle_config"].is_object() &&
             root["eagle_config"].contains("eagle_aux_hidden_state_layer_ids") &&
             !root["eagle_config"]["eagle_aux_hidden_state_layer_ids"].is_null()) {
    ids = &root["eagle_config"]["eagle_aux_hidden_state_layer_ids"];
  }
  if (ids == nullptr) {
    d->fusion_layers = DefaultFusionLayers(L);
    d->fusion_note =
        absl::StrCat("default: inputs of target layers 2, L/2, L-3 (L = ", L, ")",
                     p == DraftPublisher::kSafeAILab ? ", SafeAILab's fixed choice" : "");
    return absl::OkStatus();
  }
  std::vector<int64_t> raw;
  if (!ids->is_array()) return Bad("eagle_aux_hidden_state_layer_ids must be a list of integers");
  for (const json& v : *ids) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0) {
      return Bad("eagle_aux_hidden_state_layer_ids must be non-negative integers");
    }
    raw.push_back(v.get<int64_t>());
  }
  if (raw.size() != 3) {
    return Bad(absl::StrCat("the draft fuses ", raw.size(),
                            " target layers; retrieval heads fuse exactly 3"));
  }
  const bool outputs = p == DraftPublisher::kSpecForge;
  for (int64_t id : raw) d->fusion_layers.push_back(outputs ? id + 1 : id);
  if (outputs) {
    d->fusion_note =
        absl::StrCat("eagle_config.eagle_aux_hidden_state_layer_ids [", absl::StrJoin(raw, ", "),
                     "] are layer outputs (SpecForge/SGLang), i.e. inputs of layers [",
                     absl::StrJoin(d->fusion_layers, ", "), "]");
  } else {
    d->fusion_note =
        absl::StrCat("eagle_aux_hidden_state_layer_ids [", absl::StrJoin(raw, ", "),
                     "] are hidden_states indices, i.e. layer inputs (vLLM speculators)");
  }
  for (int64_t l : d->fusion_layers) {
    if (l >= L) {
      return Bad(absl::StrCat(d->fusion_note, ": layer ", l, " is not below the target's ", L,
                              " layers (the head reads hidden states entering a layer)"));
    }
  }
  return absl::OkStatus();
}

// The first of `candidates` present in `ws`, or "".
std::string First(const WeightSource& ws, std::initializer_list<std::string> candidates) {
  for (const std::string& c : candidates) {
    if (ws.Has(c)) return c;
  }
  return "";
}

absl::Status ResolveNames(const json& root, Eagle3Draft* d) {
  const WeightSource& ws = *d->weights;
  const std::vector<std::string> prefixes = {"midlayer.", "layers.0.", "midlayer.0.",
                                             "model.midlayer.", "model.layers.0."};
  std::string layer;
  for (const std::string& p : prefixes) {
    if (ws.Has(p + "self_attn.q_proj.weight")) {
      layer = p;
      break;
    }
    if (ws.Has(p + "self_attn.qkv_proj.weight")) {
      return Bad(
          absl::StrCat("the draft stores a fused ", p,
                       "self_attn.qkv_proj.weight; separate q_proj/k_proj tensors are needed"));
    }
  }
  if (layer.empty()) {
    std::vector<std::string> looked;
    for (const std::string& p : prefixes) looked.push_back(p + "self_attn.q_proj.weight");
    return Bad(
        absl::StrCat("no first-layer q projection (looked for ", absl::StrJoin(looked, ", "), ")"));
  }
  Eagle3DraftNames& n = d->names;
  n.q_proj = layer + "self_attn.q_proj.weight";
  n.k_proj = First(ws, {layer + "self_attn.k_proj.weight"});
  n.fc = First(ws, {"fc.weight", "model.fc.weight"});
  n.hidden_norm =
      First(ws, {layer + "hidden_norm.weight", "hidden_norm.weight", "model.hidden_norm.weight"});
  n.input_layernorm = First(ws, {layer + "input_layernorm.weight", "input_embeds_norm.weight",
                                 "model.input_embeds_norm.weight"});
  struct Need {
    const std::string* name;
    const char* what;
  };
  for (const Need& need : {Need{&n.k_proj, "self_attn.k_proj.weight"}, Need{&n.fc, "fc.weight"},
                           Need{&n.hidden_norm, "hidden_norm.weight"},
                           Need{&n.input_layernorm, "input_layernorm.weight"}}) {
    if (need.name->empty()) {
      return Bad(absl::StrCat("the draft has no ", need.what,
                              " (its first layer's tensors start with \"", layer, "\")"));
    }
  }
  if (d->attn.attention_bias) {
    n.q_bias = First(ws, {layer + "self_attn.q_proj.bias"});
    n.k_bias = First(ws, {layer + "self_attn.k_proj.bias"});
    if (n.q_bias.empty() || n.k_bias.empty()) {
      return Bad(absl::StrCat("the config sets attention biases but ", layer,
                              "self_attn.{q,k}_proj.bias are missing"));
    }
  }
  if (d->attn.qk_norm) {
    n.q_norm = First(ws, {layer + "self_attn.q_norm.weight"});
    n.k_norm = First(ws, {layer + "self_attn.k_norm.weight"});
    if (n.q_norm.empty() || n.k_norm.empty()) {
      return Bad(absl::StrCat("a ", d->attn.model_type, " draft layer needs ", layer,
                              "self_attn.{q,k}_norm.weight"));
    }
  }
  // SGLang's LlamaModel gives fc a bias when the config says `bias: true` (models/llama_eagle3.py).
  if (Flag(root, "bias")) {
    n.fc_bias = First(ws, {"fc.bias", "model.fc.bias"});
    if (n.fc_bias.empty())
      return Bad("the config sets \"bias\" (fc bias) but the draft has no fc.bias");
  }
  const bool per_layer = Flag(root, "fc_norm"), whole = Flag(root, "norm_before_fc");
  if (per_layer && whole)
    return Bad("the config sets both fc_norm and norm_before_fc, which exclude each other");
  const bool has_fc_norm = !First(ws, {"fc_norm.0.weight", "model.fc_norm.0.weight"}).empty();
  if (has_fc_norm && !per_layer) {
    return Bad("the draft has fc_norm.* tensors but its config does not set \"fc_norm\": true");
  }
  if (per_layer) {
    d->fused_norm = FusedNorm::kPerLayer;
    for (int i = 0; i < 3; ++i) {
      const std::string name = First(ws, {absl::StrCat("fc_norm.", i, ".weight"),
                                          absl::StrCat("model.fc_norm.", i, ".weight")});
      if (name.empty())
        return Bad(absl::StrCat("the config sets fc_norm but fc_norm.", i, ".weight is missing"));
      n.fused_norm.push_back(name);
    }
  } else if (whole) {
    d->fused_norm = FusedNorm::kWhole;
    const std::string name = First(ws, {"input_norm.weight", "model.input_norm.weight"});
    if (name.empty()) return Bad("the config sets norm_before_fc but input_norm.weight is missing");
    n.fused_norm.push_back(name);
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view DraftPublisherName(DraftPublisher p) {
  switch (p) {
    case DraftPublisher::kSafeAILab:
      return "safeailab";
    case DraftPublisher::kSpecForge:
      return "specforge";
    case DraftPublisher::kSpeculators:
      return "speculators";
  }
  return "?";
}

absl::StatusOr<DraftPublisher> ParseDraftPublisher(std::string_view name) {
  if (name == "safeailab") return DraftPublisher::kSafeAILab;
  if (name == "specforge" || name == "sglang" || name == "modelopt")
    return DraftPublisher::kSpecForge;
  if (name == "speculators" || name == "vllm") return DraftPublisher::kSpeculators;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown draft publisher \"", std::string(name),
                   "\" (safeailab, specforge|sglang|modelopt, speculators|vllm)"));
}

absl::StatusOr<Eagle3Draft> OpenEagle3Draft(const std::string& dir, const ModelConfig& target,
                                            const DraftPublisher* forced) {
  Eagle3Draft d;
  ASSIGN_OR_RETURN(WeightFiles files, OpenWeightFiles(dir));
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/config.json", 1 << 20));
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object())
    return Bad(absl::StrCat(dir, "/config.json is not a JSON object"));
  d.weights = std::move(files.weights);
  d.weights_file = files.file;
  d.publisher = forced != nullptr ? *forced : Detect(root, d.weights_file);
  d.publisher_detected = forced == nullptr;
  if (root.contains("eagle_config") && root["eagle_config"].is_object() &&
      root["eagle_config"].contains("use_aux_hidden_state") &&
      root["eagle_config"]["use_aux_hidden_state"].is_boolean() &&
      !root["eagle_config"]["use_aux_hidden_state"].get<bool>()) {
    return Bad(
        "eagle_config.use_aux_hidden_state is false: an EAGLE-1/2 style draft without fused target "
        "layers");
  }
  ASSIGN_OR_RETURN(json layer, LayerConfig(root, d.publisher, target));
  // A draft trained for another target: its vocabulary (t2d's length) or fused width differ.
  for (const auto& [key, value, want] :
       {std::tuple{"vocab_size", layer["vocab_size"], target.vocab_size},
        std::tuple{"target_hidden_size", root.value("target_hidden_size", json()),
                   target.hidden_size}}) {
    if (value.is_number_integer() && value.get<int64_t>() != want) {
      return absl::FailedPreconditionError(absl::StrCat(
          "eagle3 draft does not fit the target: ", key, " is ", value.get<int64_t>(),
          " in the draft but ", want, " in the target (a draft is trained for one target)"));
    }
  }
  d.draft_layers = layer["num_hidden_layers"].is_number_integer()
                       ? layer["num_hidden_layers"].get<int64_t>()
                       : 1;
  layer["num_hidden_layers"] = 1;
  absl::StatusOr<ModelConfig> attn = ParseModelConfig(layer.dump());
  if (!attn.ok()) return Bad(absl::StrCat(dir, "/config.json: ", attn.status().message()));
  d.attn = *attn;
  d.trained_positions = d.attn.max_position_embeddings;
  if (d.publisher == DraftPublisher::kSafeAILab) {
    const bool other = d.attn.rope_theta != 10000.0;
    d.rope_note =
        other ? absl::StrCat("rope_theta 10000 (SafeAILab trains with base 10000; the config's ",
                             d.attn.rope_theta, " is not used)")
              : "rope_theta 10000 (SafeAILab trains with base 10000)";
    d.attn.rope_theta = 10000.0;
  } else {
    const bool given = layer.contains("rope_theta") ||
                       (layer.contains("rope_parameters") && layer["rope_parameters"].is_object() &&
                        layer["rope_parameters"].contains("rope_theta"));
    d.rope_note = absl::StrCat(
        "rope_theta ", d.attn.rope_theta,
        given ? " (from the draft config)" : " (not in the config: the default its trainer used)");
  }
  RETURN_IF_ERROR(ResolveFusion(root, d.publisher, target, &d));
  RETURN_IF_ERROR(ResolveNames(root, &d));
  return d;
}

}  // namespace specontext
