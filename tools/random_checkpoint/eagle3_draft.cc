// Random EAGLE-3 drafts in each publisher's real layout (random_checkpoint.h Eagle3Layout; the
// facts and their sources: core/sparse/eagle3_draft.h). One decoder layer whose attention takes
// [embedding ‖ fused features] (2·hidden wide), fc fusing three target layers (3·hidden → hidden),
// its own final norm, a reduced-vocabulary LM head and the d2t/t2d maps between the draft and
// target vocabularies.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

using json = nlohmann::json;

std::string TorchDtype(DType d) {
  return d == DType::kF32 ? "float32" : d == DType::kF16 ? "float16" : "bfloat16";
}

// Draft id i stands for target id floor(i · V / D) (increasing, so t2d and d2t agree as SpecForge
// checks: nonzero(t2d) == d2t + arange(D)). d2t holds the differences, t2d marks the target ids
// that have a draft id.
bool FillVocabMap(const Eagle3DraftShape& s, const TensorSpec& spec, int64_t first, int64_t count,
                  void* dst) {
  const int64_t V = s.vocab, D = s.draft_vocab;
  if (spec.name == "d2t" && spec.dtype == DType::kI64) {
    auto* out = static_cast<int64_t*>(dst);
    for (int64_t k = 0; k < count; ++k) out[k] = (first + k) * V / D - (first + k);
    return true;
  }
  if (spec.name == "t2d" && spec.dtype == DType::kBool) {
    auto* out = static_cast<uint8_t*>(dst);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t j = first + k, i = (j * D + V - 1) / V;  // the only draft id that can map to j
      out[k] = i < D && i * V / D == j ? 1 : 0;
    }
    return true;
  }
  return false;
}

// Inputs of target layers 2, L/2, L-3 (every publisher's default), clamped into [0, L) for toy
// targets.
std::vector<int64_t> DefaultFusionLayers(int64_t L) {
  std::vector<int64_t> layers = {2, L / 2, L - 3};
  for (int64_t& l : layers) l = std::clamp<int64_t>(l, 0, std::max<int64_t>(0, L - 1));
  return layers;
}

json SpeculatorsConfig(const ModelConfig& target, const Eagle3DraftShape& s, DType dtype) {
  // speculators trains with the verifier's config as the layer's
  // (Eagle3DraftModel.from_training_args).
  ModelConfig layer = target;
  layer.num_hidden_layers = 1;
  layer.torch_dtype = TorchDtype(dtype);
  const int64_t L = target.num_hidden_layers;
  return {{"architectures", {"Eagle3Speculator"}},
          {"auto_map", {{"", "eagle3.Eagle3SpeculatorConfig"}}},
          {"draft_vocab_size", s.draft_vocab},
          {"eagle_aux_hidden_state_layer_ids", DefaultFusionLayers(L)},
          {"norm_before_residual", false},
          {"norm_before_fc", false},
          {"fc_norm", false},
          {"norm_output", false},
          {"has_no_defaults_at_init", false},
          {"speculators_config",
           {{"algorithm", "eagle3"},
            {"default_proposal_method", "greedy"},
            {"proposal_methods",
             {{{"proposal_type", "greedy"},
               {"speculative_tokens", 3},
               {"accept_tolerance", 0.0},
               {"verifier_accept_k", 1}}}},
            {"verifier",
             {{"architectures", {std::string(ArchitectureName(target.arch))}},
              {"name_or_path", "target"}}}}},
          {"speculators_model_type", "eagle3"},
          {"speculators_version", "0.3.0"},
          {"target_hidden_size", nullptr},
          {"dtype", TorchDtype(dtype)},
          {"transformer_layer_config", json::parse(ModelConfigToJson(layer))},
          {"transformers_version", "4.56.1"}};
}

// SafeAILab (eagle/traineagle3/config.json) and SpecForge (configs/*-eagle3*.json) configs.
json DraftConfig(const ModelConfig& target, const Eagle3DraftShape& s, DType dtype,
                 Eagle3Layout layout) {
  json j = {{"architectures",
             {layout == Eagle3Layout::kSafeAILab ? "LlamaForCausalLM" : "LlamaForCausalLMEagle3"}},
            {"bos_token_id", target.bos_token_id},
            {"eos_token_id",
             target.eos_token_ids.empty() ? json(nullptr) : json(target.eos_token_ids[0])},
            {"hidden_act", "silu"},
            {"hidden_size", s.hidden},
            {"initializer_range", 0.02},
            {"intermediate_size", s.intermediate},
            {"max_position_embeddings", 2048},  // drafts are trained at 2K positions
            {"model_type", "llama"},
            {"num_attention_heads", s.n_heads},
            {"num_key_value_heads", s.n_kv_heads},
            {"num_hidden_layers", 1},
            {"rms_norm_eps", target.rms_norm_eps},
            {"tie_word_embeddings", false},
            {"torch_dtype", TorchDtype(dtype)},
            {"use_cache", true},
            {"vocab_size", target.vocab_size},
            {"draft_vocab_size", s.draft_vocab}};
  if (layout == Eagle3Layout::kSafeAILab) {
    j["pad_token_id"] = 0;
    j["transformers_version"] = "4.28.1";
    return j;
  }
  j["head_dim"] = s.head_dim;
  j["rope_scaling"] = nullptr;
  // SpecForge's Llama-3 configs leave rope_theta out (LlamaConfig's 10000); its Qwen configs give
  // the target's.
  if (target.arch != Architecture::kLlama) j["rope_theta"] = target.rope_theta;
  const int64_t L = target.num_hidden_layers;
  if (layout == Eagle3Layout::kEagle31) {
    j["fc_norm"] = true;
    j["norm_output"] = true;
  } else {
    // Layer outputs: SGLang captures the input of layer id + 1 (the same layers as [2, L/2, L-3]).
    std::vector<int64_t> outputs;
    for (int64_t l : DefaultFusionLayers(L)) outputs.push_back(std::max<int64_t>(0, l - 1));
    j["eagle_config"] = {{"eagle_aux_hidden_state_layer_ids", outputs},
                         {"use_aux_hidden_state", true}};
  }
  return j;
}

}  // namespace

absl::StatusOr<Eagle3Layout> ParseEagle3Layout(std::string_view name) {
  if (name == "safeailab") return Eagle3Layout::kSafeAILab;
  if (name == "specforge") return Eagle3Layout::kSpecForge;
  if (name == "eagle3.1") return Eagle3Layout::kEagle31;
  if (name == "speculators") return Eagle3Layout::kSpeculators;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown EAGLE-3 draft layout \"", std::string(name),
                   "\" (safeailab, specforge, eagle3.1, speculators)"));
}

DType Eagle3LayoutDType(Eagle3Layout layout) {
  return layout == Eagle3Layout::kSafeAILab ? DType::kF16 : DType::kBF16;
}

Eagle3DraftShape Eagle3DraftShapeFor(const ModelConfig& target, Eagle3Layout layout) {
  Eagle3DraftShape s;
  s.hidden = target.hidden_size;
  s.intermediate = target.intermediate_size;
  s.n_heads = target.num_attention_heads;
  s.n_kv_heads = target.num_key_value_heads;
  s.head_dim = target.head_dim;
  s.vocab = target.vocab_size;
  // EAGLE-3 drafts of Llama-3 predict over a 32000-token subset of the 128256-token vocabulary.
  s.draft_vocab = std::min<int64_t>(32000, std::max<int64_t>(1, target.vocab_size / 4));
  s.qk_norm = layout == Eagle3Layout::kSpeculators && target.qk_norm;
  return s;
}

std::vector<TensorSpec> Eagle3DraftTensors(const Eagle3DraftShape& s, DType dtype,
                                           Eagle3Layout layout) {
  const int64_t h = s.hidden, q = s.n_heads * s.head_dim, kv = s.n_kv_heads * s.head_dim;
  const std::string l = layout == Eagle3Layout::kSpeculators ? "layers.0." : "midlayer.";
  std::vector<TensorSpec> t;
  if (layout == Eagle3Layout::kSpeculators)
    t.push_back({"embed_tokens.weight", dtype, {s.vocab, h}});
  t.push_back({"fc.weight", dtype, {h, 3 * h}});
  if (layout == Eagle3Layout::kEagle31) {
    for (int i = 0; i < 3; ++i) t.push_back({absl::StrCat("fc_norm.", i, ".weight"), dtype, {h}});
  }
  t.push_back({l + "hidden_norm.weight", dtype, {h}});
  t.push_back({l + "input_layernorm.weight", dtype, {h}});
  t.push_back({l + "self_attn.q_proj.weight", dtype, {q, 2 * h}});
  t.push_back({l + "self_attn.k_proj.weight", dtype, {kv, 2 * h}});
  t.push_back({l + "self_attn.v_proj.weight", dtype, {kv, 2 * h}});
  t.push_back({l + "self_attn.o_proj.weight", dtype, {h, q}});
  if (s.qk_norm) {
    t.push_back({l + "self_attn.q_norm.weight", dtype, {s.head_dim}});
    t.push_back({l + "self_attn.k_norm.weight", dtype, {s.head_dim}});
  }
  t.push_back({l + "post_attention_layernorm.weight", dtype, {h}});
  t.push_back({l + "mlp.gate_proj.weight", dtype, {s.intermediate, h}});
  t.push_back({l + "mlp.up_proj.weight", dtype, {s.intermediate, h}});
  t.push_back({l + "mlp.down_proj.weight", dtype, {h, s.intermediate}});
  t.push_back({"norm.weight", dtype, {h}});
  t.push_back({"lm_head.weight", dtype, {s.draft_vocab, h}});
  t.push_back({"d2t", DType::kI64, {s.draft_vocab}});
  t.push_back({"t2d", DType::kBool, {s.vocab}});
  return t;
}

absl::Status WriteRandomEagle3Draft(const ModelConfig& target, const std::string& out_dir,
                                    const RandomCheckpointOptions& options, Eagle3Layout layout) {
  if (!IsFloating(options.dtype))
    return absl::InvalidArgumentError("draft dtype must be f32, f16 or bf16");
  if (layout == Eagle3Layout::kSafeAILab &&
      (target.arch != Architecture::kLlama ||
       target.head_dim * target.num_attention_heads != target.hidden_size)) {
    return absl::InvalidArgumentError(
        "SafeAILab's EAGLE-3 trainer takes Llama targets with head_dim = hidden / heads");
  }
  if (layout == Eagle3Layout::kSpeculators && target.arch == Architecture::kQwen2) {
    return absl::InvalidArgumentError("speculators' EAGLE-3 layers are llama or qwen3 (no qwen2)");
  }
  const Eagle3DraftShape s = Eagle3DraftShapeFor(target, layout);
  const json j = layout == Eagle3Layout::kSpeculators
                     ? SpeculatorsConfig(target, s, options.dtype)
                     : DraftConfig(target, s, options.dtype, layout);
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  {
    std::ofstream f(fs::path(out_dir) / "config.json", std::ios::trunc);
    f << j.dump(2) << "\n";
    f.close();
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  }
  RandomCheckpointOptions o = options;
  o.write_tokenizer = false;
  if (layout == Eagle3Layout::kSafeAILab) o.format = WeightsFormat::kPytorchBin;
  o.special_fill = [s](const TensorSpec& spec, int64_t first, int64_t count, void* dst) {
    return FillVocabMap(s, spec, first, count, dst);
  };
  return WriteRandomTensors(Eagle3DraftTensors(s, options.dtype, layout), out_dir, o);
}

}  // namespace specontext
