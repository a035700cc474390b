// config.json / generation_config.json parsing and validation, and config.json serialisation.
#include "core/io/model_config.h"

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxConfigBytes = 16u << 20;

absl::Status Bad(const std::string& msg) { return absl::InvalidArgumentError(absl::StrCat("config.json: ", msg)); }

bool IsInt(const json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

// Optional integer field: absent or null keeps *out. Present non-integers are an error.
absl::Status OptInt(const json& root, const char* key, int64_t* out) {
  if (!root.contains(key) || root[key].is_null()) return absl::OkStatus();
  const json& v = root[key];
  if (!IsInt(v) || (v.is_number_unsigned() && v.get<uint64_t>() > (1ull << 62))) {
    return Bad(absl::StrCat("\"", key, "\" must be an integer, got ", v.dump()));
  }
  *out = v.get<int64_t>();
  return absl::OkStatus();
}

absl::Status ReqPositiveInt(const json& root, const char* key, int64_t* out) {
  if (!root.contains(key) || root[key].is_null()) return Bad(absl::StrCat("missing required \"", key, "\""));
  RETURN_IF_ERROR(OptInt(root, key, out));
  if (*out <= 0) return Bad(absl::StrCat("\"", key, "\" must be > 0, got ", *out));
  return absl::OkStatus();
}

absl::Status OptNumber(const json& root, const char* key, double* out) {
  if (!root.contains(key) || root[key].is_null()) return absl::OkStatus();
  if (!root[key].is_number()) return Bad(absl::StrCat("\"", key, "\" must be a number, got ", root[key].dump()));
  *out = root[key].get<double>();
  return absl::OkStatus();
}

absl::Status OptBool(const json& root, const char* key, bool* out) {
  if (!root.contains(key) || root[key].is_null()) return absl::OkStatus();
  if (!root[key].is_boolean()) return Bad(absl::StrCat("\"", key, "\" must be true or false, got ", root[key].dump()));
  *out = root[key].get<bool>();
  return absl::OkStatus();
}

// eos_token_id: an int, a list of ints, or null/absent (empty list).
absl::Status ParseEos(const json& root, std::vector<int64_t>* out) {
  if (!root.contains("eos_token_id") || root["eos_token_id"].is_null()) return absl::OkStatus();
  const json& v = root["eos_token_id"];
  out->clear();
  if (IsInt(v)) {
    out->push_back(v.get<int64_t>());
  } else if (v.is_array()) {
    for (const json& e : v) {
      if (!IsInt(e)) return Bad(absl::StrCat("\"eos_token_id\" list holds a non-integer ", e.dump()));
      out->push_back(e.get<int64_t>());
    }
  } else {
    return Bad(absl::StrCat("\"eos_token_id\" must be an integer or a list of integers, got ", v.dump()));
  }
  for (int64_t id : *out) {
    if (id < 0) return Bad(absl::StrCat("\"eos_token_id\" ", id, " is negative"));
  }
  return absl::OkStatus();
}

// rope_scaling (transformers 4.x) or rope_parameters (5.x): null or an object with rope_type/type.
absl::Status ParseRopeScaling(const json& v, const char* key, RopeScaling* out) {
  if (v.is_null()) return absl::OkStatus();
  if (!v.is_object()) return Bad(absl::StrCat("\"", key, "\" must be null or an object"));
  std::string type;
  for (const char* k : {"rope_type", "type"}) {
    if (v.contains(k) && v[k].is_string()) {
      type = v[k].get<std::string>();
      break;
    }
  }
  if (type.empty()) return Bad(absl::StrCat("\"", key, "\" has no \"rope_type\" (or \"type\")"));
  if (type != "default" && type != "linear" && type != "llama3" && type != "yarn") {
    return Bad(absl::StrCat("unsupported ", key, " type \"", type, "\" (supported: default, linear, llama3, yarn)"));
  }
  RopeScaling r;
  r.type = type == "default" ? "" : type;
  auto num = [&](const char* k, double* d) -> absl::Status {
    if (!v.contains(k) || v[k].is_null()) return absl::OkStatus();
    if (!v[k].is_number()) return Bad(absl::StrCat(key, ".", k, " must be a number"));
    *d = v[k].get<double>();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(num("factor", &r.factor));
  RETURN_IF_ERROR(num("low_freq_factor", &r.low_freq_factor));
  RETURN_IF_ERROR(num("high_freq_factor", &r.high_freq_factor));
  RETURN_IF_ERROR(num("attention_factor", &r.attention_factor));
  RETURN_IF_ERROR(num("beta_fast", &r.beta_fast));
  RETURN_IF_ERROR(num("beta_slow", &r.beta_slow));
  RETURN_IF_ERROR(OptInt(v, "original_max_position_embeddings", &r.original_max_position_embeddings));
  if (!r.type.empty()) {
    if (!v.contains("factor")) return Bad(absl::StrCat(key, " type ", type, " needs \"factor\""));
    if (!(r.factor > 0)) return Bad(absl::StrCat(key, ".factor must be > 0"));
  }
  if (r.type == "llama3") {
    if (r.original_max_position_embeddings <= 0) {
      return Bad(absl::StrCat(key, " llama3 needs original_max_position_embeddings > 0"));
    }
    if (!(r.low_freq_factor > 0) || !(r.high_freq_factor > r.low_freq_factor)) {
      return Bad(absl::StrCat(key, " llama3 needs 0 < low_freq_factor < high_freq_factor"));
    }
  }
  if (r.original_max_position_embeddings < 0) return Bad(absl::StrCat(key, ".original_max_position_embeddings < 0"));
  *out = r;
  return absl::OkStatus();
}

// Settings that would change the model's output in ways this engine does not implement: refused by name
// rather than silently computing something else.
absl::Status CheckUnsupportedFeatures(const json& root, const ModelConfig& c) {
  if (root.contains("quantization_config") && !root["quantization_config"].is_null()) {
    const json& q = root["quantization_config"];
    std::string method = "unknown";
    if (q.is_object() && q.contains("quant_method") && q["quant_method"].is_string()) {
      method = q["quant_method"].get<std::string>();
    }
    return Bad(absl::StrCat("the checkpoint is quantized (quantization_config.quant_method \"", method,
                            "\"); this engine loads f32/f16/bf16 safetensors or GGUF files: use the unquantized "
                            "checkpoint or a GGUF export of the model"));
  }
  if (root.contains("hidden_act") && !root["hidden_act"].is_null()) {
    const json& act = root["hidden_act"];
    if (!act.is_string() || act.get<std::string>() != "silu") {
      return Bad(absl::StrCat("unsupported \"hidden_act\" ", act.dump(), " (supported: \"silu\")"));
    }
  }
  // Qwen2/3: sliding-window attention runs on layers >= max_window_layers when use_sliding_window is set;
  // transformers 5 lists each layer's kind in layer_types.
  bool use_sliding = false;
  RETURN_IF_ERROR(OptBool(root, "use_sliding_window", &use_sliding));
  if (use_sliding) {
    int64_t max_window_layers = 0;
    RETURN_IF_ERROR(OptInt(root, "max_window_layers", &max_window_layers));
    if (max_window_layers < c.num_hidden_layers) {
      return Bad(absl::StrCat("\"use_sliding_window\": true (sliding-window attention from layer ", max_window_layers,
                              ") is not supported; this engine runs full attention on every layer"));
    }
  }
  if (root.contains("layer_types") && root["layer_types"].is_array()) {
    for (const json& t : root["layer_types"]) {
      if (!t.is_string() || t.get<std::string>() != "full_attention") {
        return Bad(absl::StrCat("layer_types holds ", t.dump(), "; only \"full_attention\" layers are supported"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(std::string_view text, const char* what) {
  json root = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": not valid JSON"));
  if (!root.is_object()) return absl::InvalidArgumentError(absl::StrCat(what, ": not a JSON object"));
  return root;
}

}  // namespace

std::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kLlama: return "LlamaForCausalLM";
    case Architecture::kQwen2: return "Qwen2ForCausalLM";
    case Architecture::kQwen3: return "Qwen3ForCausalLM";
  }
  return "?";
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  ASSIGN_OR_RETURN(json root, ParseObject(json_text, "config.json"));
  ModelConfig c;
  std::string arch_name;
  if (root.contains("architectures") && root["architectures"].is_array() && !root["architectures"].empty() &&
      root["architectures"][0].is_string()) {
    arch_name = root["architectures"][0].get<std::string>();
  }
  if (root.contains("model_type") && root["model_type"].is_string()) c.model_type = root["model_type"].get<std::string>();
  const std::string key = arch_name.empty() ? c.model_type : arch_name;
  if (key == "LlamaForCausalLM" || key == "llama") {
    c.arch = Architecture::kLlama;
  } else if (key == "Qwen2ForCausalLM" || key == "qwen2") {
    c.arch = Architecture::kQwen2;
  } else if (key == "Qwen3ForCausalLM" || key == "qwen3") {
    c.arch = Architecture::kQwen3;
  } else {
    return Bad(absl::StrCat("unsupported architecture \"", key.empty() ? "(none given)" : key,
                            "\" (supported: LlamaForCausalLM/llama, Qwen2ForCausalLM/qwen2, Qwen3ForCausalLM/qwen3)"));
  }
  if (c.model_type.empty()) {
    c.model_type = c.arch == Architecture::kLlama ? "llama" : c.arch == Architecture::kQwen2 ? "qwen2" : "qwen3";
  }
  RETURN_IF_ERROR(ReqPositiveInt(root, "vocab_size", &c.vocab_size));
  RETURN_IF_ERROR(ReqPositiveInt(root, "hidden_size", &c.hidden_size));
  RETURN_IF_ERROR(ReqPositiveInt(root, "intermediate_size", &c.intermediate_size));
  RETURN_IF_ERROR(ReqPositiveInt(root, "num_hidden_layers", &c.num_hidden_layers));
  RETURN_IF_ERROR(ReqPositiveInt(root, "num_attention_heads", &c.num_attention_heads));
  RETURN_IF_ERROR(ReqPositiveInt(root, "max_position_embeddings", &c.max_position_embeddings));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(OptInt(root, "num_key_value_heads", &c.num_key_value_heads));
  if (c.num_key_value_heads <= 0) return Bad(absl::StrCat("\"num_key_value_heads\" must be > 0, got ", c.num_key_value_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Bad(absl::StrCat("num_attention_heads ", c.num_attention_heads, " is not a multiple of num_key_value_heads ",
                            c.num_key_value_heads));
  }
  if (root.contains("head_dim") && !root["head_dim"].is_null()) {
    RETURN_IF_ERROR(OptInt(root, "head_dim", &c.head_dim));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return Bad(absl::StrCat("hidden_size ", c.hidden_size, " is not a multiple of num_attention_heads ",
                              c.num_attention_heads, " and no head_dim is given"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) return Bad(absl::StrCat("head_dim must be even and > 0, got ", c.head_dim));
  // Cap sizes so products stay far from int64 overflow downstream.
  struct Cap {
    const char* name;
    int64_t value, max;
  };
  for (const Cap& cap : {Cap{"vocab_size", c.vocab_size, 1 << 24}, Cap{"hidden_size", c.hidden_size, 1 << 20},
                         Cap{"intermediate_size", c.intermediate_size, 1 << 22},
                         Cap{"num_hidden_layers", c.num_hidden_layers, 4096},
                         Cap{"num_attention_heads", c.num_attention_heads, 1 << 16}, Cap{"head_dim", c.head_dim, 1 << 16},
                         Cap{"max_position_embeddings", c.max_position_embeddings, int64_t{1} << 40}}) {
    if (cap.value > cap.max) {
      return Bad(absl::StrCat("\"", cap.name, "\" = ", cap.value, " is implausibly large (limit ", cap.max, ")"));
    }
  }
  RETURN_IF_ERROR(OptNumber(root, "rms_norm_eps", &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0)) return Bad("\"rms_norm_eps\" must be > 0");
  if (root.contains("rope_parameters") && !root["rope_parameters"].is_null()) {  // transformers 5.x
    RETURN_IF_ERROR(ParseRopeScaling(root["rope_parameters"], "rope_parameters", &c.rope_scaling));
    RETURN_IF_ERROR(OptNumber(root["rope_parameters"], "rope_theta", &c.rope_theta));
  }
  RETURN_IF_ERROR(OptNumber(root, "rope_theta", &c.rope_theta));
  if (!(c.rope_theta > 0)) return Bad("\"rope_theta\" must be > 0");
  if (root.contains("rope_scaling")) RETURN_IF_ERROR(ParseRopeScaling(root["rope_scaling"], "rope_scaling", &c.rope_scaling));
  if (root.contains("specontext_rope_freq_factors") && !root["specontext_rope_freq_factors"].is_null()) {
    const json& ff = root["specontext_rope_freq_factors"];
    if (!ff.is_array() || ff.size() != static_cast<size_t>(c.head_dim / 2)) {
      return Bad(absl::StrCat("\"specontext_rope_freq_factors\" must be a list of head_dim / 2 = ", c.head_dim / 2,
                              " numbers"));
    }
    for (const json& f : ff) {
      if (!f.is_number() || !(f.get<double>() > 0)) {
        return Bad("\"specontext_rope_freq_factors\" holds a non-positive or non-numeric factor");
      }
      c.rope_scaling.freq_factors.push_back(f.get<double>());
    }
  }
  RETURN_IF_ERROR(OptBool(root, "tie_word_embeddings", &c.tie_word_embeddings));
  RETURN_IF_ERROR(OptBool(root, "attention_bias", &c.attention_bias));
  // HF: Llama and Qwen3 give q/k/v/o the attention_bias; Qwen2 has q/k/v biases always and no o bias.
  c.o_proj_bias = c.attention_bias && c.arch != Architecture::kQwen2;
  if (c.arch == Architecture::kQwen2) c.attention_bias = true;
  if (c.arch == Architecture::kLlama) RETURN_IF_ERROR(OptBool(root, "mlp_bias", &c.mlp_bias));
  c.qk_norm = c.arch == Architecture::kQwen3;
  RETURN_IF_ERROR(CheckUnsupportedFeatures(root, c));
  RETURN_IF_ERROR(OptBool(root, "specontext_rope_interleaved", &c.rope_interleaved));
  for (const char* k : {"torch_dtype", "dtype"}) {
    if (root.contains(k) && root[k].is_string()) {
      c.torch_dtype = root[k].get<std::string>();
      break;
    }
  }
  RETURN_IF_ERROR(OptInt(root, "bos_token_id", &c.bos_token_id));
  RETURN_IF_ERROR(ParseEos(root, &c.eos_token_ids));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxConfigBytes));
  absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
  if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

absl::StatusOr<GenerationDefaults> ParseGenerationConfig(std::string_view json_text) {
  ASSIGN_OR_RETURN(json root, ParseObject(json_text, "generation_config.json"));
  GenerationDefaults g;
  auto wrap = [](absl::Status s) {
    if (s.ok()) return s;
    std::string m(s.message());
    if (m.rfind("config.json: ", 0) == 0) m = m.substr(13);
    return absl::InvalidArgumentError(absl::StrCat("generation_config.json: ", m));
  };
  RETURN_IF_ERROR(wrap(OptBool(root, "do_sample", &g.do_sample)));
  RETURN_IF_ERROR(wrap(OptNumber(root, "temperature", &g.temperature)));
  RETURN_IF_ERROR(wrap(OptNumber(root, "top_p", &g.top_p)));
  RETURN_IF_ERROR(wrap(OptInt(root, "top_k", &g.top_k)));
  RETURN_IF_ERROR(wrap(OptNumber(root, "repetition_penalty", &g.repetition_penalty)));
  if (!(g.repetition_penalty > 0)) return wrap(Bad("\"repetition_penalty\" must be > 0"));
  RETURN_IF_ERROR(wrap(OptInt(root, "bos_token_id", &g.bos_token_id)));
  RETURN_IF_ERROR(wrap(ParseEos(root, &g.eos_token_ids)));
  if (g.temperature < 0) return wrap(Bad("\"temperature\" must be >= 0"));
  if (!(g.top_p > 0 && g.top_p <= 1)) return wrap(Bad("\"top_p\" must be in (0, 1]"));
  if (g.top_k < 0) return wrap(Bad("\"top_k\" must be >= 0"));
  return g;
}

absl::StatusOr<GenerationDefaults> LoadGenerationConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxConfigBytes));
  absl::StatusOr<GenerationDefaults> g = ParseGenerationConfig(text);
  if (!g.ok()) return absl::Status(g.status().code(), absl::StrCat(path, ": ", g.status().message()));
  return g;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json j = json::object();
  j["architectures"] = {std::string(ArchitectureName(c.arch))};
  j["model_type"] = c.model_type.empty() ? (c.arch == Architecture::kLlama   ? "llama"
                                            : c.arch == Architecture::kQwen2 ? "qwen2"
                                                                             : "qwen3")
                                         : c.model_type;
  const std::string dtype = c.torch_dtype.empty() ? "bfloat16" : c.torch_dtype;
  j["torch_dtype"] = dtype;  // transformers 4.x name
  j["dtype"] = dtype;        // transformers 5.x name
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["hidden_act"] = "silu";
  j["initializer_range"] = 0.02;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["use_cache"] = true;
  j["attention_dropout"] = 0.0;
  if (c.arch != Architecture::kQwen2) j["attention_bias"] = c.attention_bias;
  if (c.arch == Architecture::kLlama) j["mlp_bias"] = c.mlp_bias;
  if (c.arch != Architecture::kLlama) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = c.num_hidden_layers;
  }
  if (c.rope_interleaved) j["specontext_rope_interleaved"] = true;
  if (!c.rope_scaling.freq_factors.empty()) j["specontext_rope_freq_factors"] = c.rope_scaling.freq_factors;
  if (c.rope_scaling.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    const RopeScaling& r = c.rope_scaling;
    json rs = {{"rope_type", r.type}, {"factor", r.factor}};
    if (r.type == "llama3") {
      rs["low_freq_factor"] = r.low_freq_factor;
      rs["high_freq_factor"] = r.high_freq_factor;
    }
    if (r.type == "yarn") {
      rs["beta_fast"] = r.beta_fast;
      rs["beta_slow"] = r.beta_slow;
      if (r.attention_factor > 0) rs["attention_factor"] = r.attention_factor;
    }
    if (r.original_max_position_embeddings > 0) rs["original_max_position_embeddings"] = r.original_max_position_embeddings;
    j["rope_scaling"] = rs;
  }
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  // replace: a caller-built config may hold invalid UTF-8 in a string; dump must not throw.
  return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace specontext
