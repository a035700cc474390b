// GGUF metadata -> ModelConfig, GgufVocab and generation defaults; OpenGgufCheckpoint.
// Key names and the converter's conventions: gguf-py constants.py (Keys.*) and
// convert_hf_to_gguf.py.
#include "core/io/gguf_checkpoint.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status BadKey(const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("GGUF metadata \"", key, "\" ", what));
}

// An integer value; an array of equal integers (some converters write per-layer values) counts as
// one.
absl::StatusOr<std::optional<int64_t>> OptInt(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::kArray && v->count > 0 && GgufIsInteger(v->elem_type)) {
    const std::optional<int64_t> first = v->Element(0).AsInt();
    for (uint64_t k = 1; k < v->count; ++k) {
      if (v->Element(k).AsInt() != first) {
        return absl::UnimplementedError(absl::StrCat(
            "GGUF metadata \"", key, "\" differs between layers; the engine needs one value"));
      }
    }
    if (first) return first;
  }
  const std::optional<int64_t> i = v->AsInt();
  if (!i) return BadKey(key, absl::StrCat("must be an integer, not ", GgufTypeName(v->type)));
  return i;
}

absl::StatusOr<int64_t> ReqPositive(const GgufFile& f, const std::string& key) {
  ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(f, key));
  if (!v) return absl::InvalidArgumentError(absl::StrCat("GGUF metadata is missing \"", key, "\""));
  if (*v <= 0) return BadKey(key, absl::StrCat("must be > 0, got ", *v));
  return *v;
}

absl::StatusOr<std::optional<double>> OptNum(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return std::nullopt;
  const std::optional<double> d = v->AsDouble();
  if (!d || !std::isfinite(*d)) return BadKey(key, absl::StrCat("must be a finite number"));
  return d;
}

absl::StatusOr<std::optional<std::string>> OptStr(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::kString)
    return BadKey(key, absl::StrCat("must be a string, not ", GgufTypeName(v->type)));
  return std::string(v->str);
}

absl::StatusOr<std::optional<bool>> OptBool(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufType::kBool)
    return BadKey(key, absl::StrCat("must be a bool, not ", GgufTypeName(v->type)));
  return v->i != 0;
}

// {arch}.rope.scaling.* (linear, yarn; the legacy {arch}.rope.scale_linear) and the rope_freqs
// tensor.
absl::Status ReadRopeScaling(const GgufFile& f, const std::string& a, ModelConfig* c) {
  RopeScaling& r = c->rope_scaling;
  ASSIGN_OR_RETURN(std::optional<std::string> type, OptStr(f, a + ".rope.scaling.type"));
  ASSIGN_OR_RETURN(std::optional<double> factor, OptNum(f, a + ".rope.scaling.factor"));
  ASSIGN_OR_RETURN(std::optional<double> linear, OptNum(f, a + ".rope.scale_linear"));
  if (!type && linear && *linear != 1.0) {
    type = "linear";
    factor = linear;
  }
  if (type && *type != "none") {
    if (*type != "linear" && *type != "yarn") {
      return absl::UnimplementedError(
          absl::StrCat("GGUF RoPE scaling type \"", *type,
                       "\" is not supported (supported: none, linear, yarn)"));
    }
    if (!factor || !(*factor > 0))
      return BadKey(a + ".rope.scaling.factor", "must be > 0 for scaling " + *type);
    r.type = *type;
    r.factor = *factor;
  }
  if (r.type == "yarn") {
    ASSIGN_OR_RETURN(std::optional<int64_t> orig,
                     OptInt(f, a + ".rope.scaling.original_context_length"));
    if (orig) r.original_max_position_embeddings = *orig;
    // The converter writes HF's attention_factor, beta_fast and beta_slow under these names.
    ASSIGN_OR_RETURN(std::optional<double> attn, OptNum(f, a + ".rope.scaling.yarn_attn_factor"));
    ASSIGN_OR_RETURN(std::optional<double> fast, OptNum(f, a + ".rope.scaling.yarn_beta_fast"));
    ASSIGN_OR_RETURN(std::optional<double> slow, OptNum(f, a + ".rope.scaling.yarn_beta_slow"));
    ASSIGN_OR_RETURN(std::optional<double> log_mul,
                     OptNum(f, a + ".rope.scaling.yarn_log_multiplier"));
    if (attn) r.attention_factor = *attn;
    if (fast) r.beta_fast = *fast;
    if (slow) r.beta_slow = *slow;
    if (log_mul && *log_mul != 0) {
      return absl::UnimplementedError(
          "GGUF YaRN with a log multiplier (DeepSeek's mscale) is not supported");
    }
    if (r.original_max_position_embeddings < 0)
      return BadKey(a + ".rope.scaling.original_context_length", "< 0");
  }
  // Llama 3.1's llama3 scaling: the converter writes no scaling metadata but a rope_freqs tensor of
  // per-frequency divisors (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
  if (const GgufTensorInfo* t = f.FindTensor("rope_freqs.weight")) {
    if (t->type != GgmlType::kF32 || t->n_dims != 1 || t->ne[0] != c->head_dim / 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF tensor rope_freqs.weight must be F32 of head_dim / 2 = ", c->head_dim / 2,
          " elements"));
    }
    const uint8_t* p = f.TensorData(*t);
    for (int64_t j = 0; j < t->ne[0]; ++j) {
      float v;
      std::memcpy(&v, p + 4 * j, 4);
      if (!(v > 0) || !std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("GGUF tensor rope_freqs.weight: factor ", j, " is ", v));
      }
      r.freq_factors.push_back(v);
    }
  }
  return absl::OkStatus();
}

absl::Status CheckCaps(const ModelConfig& c) {
  struct Cap {
    const char* name;
    int64_t value, max;
  };
  for (const Cap& cap :
       {Cap{"vocab size", c.vocab_size, 1 << 24}, Cap{"embedding_length", c.hidden_size, 1 << 20},
        Cap{"feed_forward_length", c.intermediate_size, 1 << 22},
        Cap{"block_count", c.num_hidden_layers, 4096},
        Cap{"attention.head_count", c.num_attention_heads, 1 << 16},
        Cap{"attention.key_length", c.head_dim, 1 << 16},
        Cap{"context_length", c.max_position_embeddings, int64_t{1} << 40}}) {
    if (cap.value > cap.max) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF ", cap.name, " = ", cap.value, " is implausibly large (limit ", cap.max, ")"));
    }
  }
  return absl::OkStatus();
}

// End-of-generation ids: EOS, plus EOT and EOM when the file names them (llama.cpp stops on all
// three).
absl::StatusOr<std::vector<int64_t>> EosIds(const GgufFile& f) {
  std::vector<int64_t> ids;
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                          "tokenizer.ggml.eom_token_id"}) {
    ASSIGN_OR_RETURN(std::optional<int64_t> id, OptInt(f, key));
    if (id && *id >= 0 && std::find(ids.begin(), ids.end(), *id) == ids.end()) ids.push_back(*id);
  }
  return ids;
}

}  // namespace

absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& f) {
  ASSIGN_OR_RETURN(std::optional<std::string> arch, OptStr(f, "general.architecture"));
  if (!arch) return absl::InvalidArgumentError("GGUF metadata is missing \"general.architecture\"");
  ModelConfig c;
  if (*arch == "llama") {
    c.arch = Architecture::kLlama;
  } else if (*arch == "qwen2") {
    c.arch = Architecture::kQwen2;
  } else if (*arch == "qwen3") {
    c.arch = Architecture::kQwen3;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        "GGUF architecture \"", *arch, "\" is not supported (supported: llama, qwen2, qwen3)"));
  }
  c.model_type = *arch;
  const std::string& a = *arch;
  ASSIGN_OR_RETURN(c.hidden_size, ReqPositive(f, a + ".embedding_length"));
  ASSIGN_OR_RETURN(c.intermediate_size, ReqPositive(f, a + ".feed_forward_length"));
  ASSIGN_OR_RETURN(c.num_hidden_layers, ReqPositive(f, a + ".block_count"));
  ASSIGN_OR_RETURN(c.num_attention_heads, ReqPositive(f, a + ".attention.head_count"));
  ASSIGN_OR_RETURN(c.max_position_embeddings, ReqPositive(f, a + ".context_length"));
  ASSIGN_OR_RETURN(std::optional<int64_t> kv, OptInt(f, a + ".attention.head_count_kv"));
  c.num_key_value_heads = kv.value_or(c.num_attention_heads);
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return BadKey(a + ".attention.head_count_kv",
                  absl::StrCat("= ", c.num_key_value_heads, " must divide head_count ",
                               c.num_attention_heads));
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> key_length, OptInt(f, a + ".attention.key_length"));
  if (!key_length && c.hidden_size % c.num_attention_heads != 0) {
    return BadKey(a + ".attention.key_length",
                  "is absent and embedding_length is not a multiple of head_count");
  }
  c.head_dim = key_length.value_or(c.hidden_size / c.num_attention_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return BadKey(a + ".attention.key_length",
                  absl::StrCat("(head dim) must be even and > 0, got ", c.head_dim));
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> value_length, OptInt(f, a + ".attention.value_length"));
  if (value_length && *value_length != c.head_dim) {
    return absl::UnimplementedError(absl::StrCat("GGUF value_length ", *value_length,
                                                 " differs from key_length ", c.head_dim,
                                                 "; the engine needs equal head dims"));
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> rope_dims, OptInt(f, a + ".rope.dimension_count"));
  if (rope_dims && *rope_dims != c.head_dim) {
    return absl::UnimplementedError(absl::StrCat("GGUF rope.dimension_count ", *rope_dims,
                                                 " is not the head dim ", c.head_dim,
                                                 " (partial rotary embeddings are not supported)"));
  }
  ASSIGN_OR_RETURN(std::optional<double> eps, OptNum(f, a + ".attention.layer_norm_rms_epsilon"));
  if (eps) c.rms_norm_eps = *eps;
  if (!(c.rms_norm_eps > 0)) return BadKey(a + ".attention.layer_norm_rms_epsilon", "must be > 0");
  ASSIGN_OR_RETURN(std::optional<double> theta, OptNum(f, a + ".rope.freq_base"));
  c.rope_theta = theta.value_or(10000.0);  // llama.cpp's default
  if (!(c.rope_theta > 0)) return BadKey(a + ".rope.freq_base", "must be > 0");
  RETURN_IF_ERROR(ReadRopeScaling(f, a, &c));

  // Vocabulary size: the declared one, else the embedding's rows, else the token list.
  const GgufValue* tokens = f.Find("tokenizer.ggml.tokens");
  const GgufTensorInfo* embd = f.FindTensor("token_embd.weight");
  ASSIGN_OR_RETURN(std::optional<int64_t> vocab, OptInt(f, a + ".vocab_size"));
  if (!vocab && embd != nullptr && embd->n_dims == 2) vocab = embd->ne[1];
  if (!vocab && tokens != nullptr) vocab = static_cast<int64_t>(tokens->count);
  if (!vocab || *vocab <= 0)
    return absl::InvalidArgumentError("GGUF file gives no vocabulary size");
  c.vocab_size = *vocab;
  if (tokens != nullptr && tokens->count > static_cast<uint64_t>(c.vocab_size)) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF token list has ", tokens->count,
                                                   " tokens, more than the model's vocabulary of ",
                                                   c.vocab_size));
  }
  c.tie_word_embeddings = f.FindTensor("output.weight") == nullptr;
  c.attention_bias = c.arch == Architecture::kQwen2 || f.FindTensor("blk.0.attn_q.bias") != nullptr;
  // Llama's attention_bias also gives o_proj a bias, and mlp_bias gate/up/down: the tensors tell.
  c.o_proj_bias = f.FindTensor("blk.0.attn_output.bias") != nullptr;
  c.mlp_bias = f.FindTensor("blk.0.ffn_gate.bias") != nullptr ||
               f.FindTensor("blk.0.ffn_up.bias") != nullptr ||
               f.FindTensor("blk.0.ffn_down.bias") != nullptr;
  c.qk_norm = c.arch == Architecture::kQwen3;
  ASSIGN_OR_RETURN(std::optional<int64_t> bos, OptInt(f, "tokenizer.ggml.bos_token_id"));
  c.bos_token_id = bos.value_or(-1);
  ASSIGN_OR_RETURN(c.eos_token_ids, EosIds(f));
  RETURN_IF_ERROR(CheckCaps(c));
  return c;
}

absl::StatusOr<GgufVocab> GgufVocabFromMetadata(const GgufFile& f) {
  const GgufValue* tokens = f.Find("tokenizer.ggml.tokens");
  if (tokens == nullptr) return absl::NotFoundError("GGUF file has no tokenizer.ggml.tokens");
  if (tokens->type != GgufType::kArray || tokens->elem_type != GgufType::kString) {
    return BadKey("tokenizer.ggml.tokens", "must be an array of strings");
  }
  GgufVocab v;
  ASSIGN_OR_RETURN(std::optional<std::string> model, OptStr(f, "tokenizer.ggml.model"));
  ASSIGN_OR_RETURN(std::optional<std::string> pre, OptStr(f, "tokenizer.ggml.pre"));
  ASSIGN_OR_RETURN(std::optional<std::string> chat, OptStr(f, "tokenizer.chat_template"));
  v.model = model.value_or("");
  v.pre = pre.value_or("");
  v.chat_template = chat.value_or("");
  v.tokens.assign(tokens->strings.begin(), tokens->strings.end());
  if (const GgufValue* m = f.Find("tokenizer.ggml.merges")) {
    if (m->type != GgufType::kArray || m->elem_type != GgufType::kString) {
      return BadKey("tokenizer.ggml.merges", "must be an array of strings");
    }
    v.merges.assign(m->strings.begin(), m->strings.end());
  }
  if (const GgufValue* t = f.Find("tokenizer.ggml.token_type")) {
    if (t->type != GgufType::kArray || !GgufIsInteger(t->elem_type)) {
      return BadKey("tokenizer.ggml.token_type", "must be an array of integers");
    }
    v.token_types.reserve(t->count);
    for (uint64_t k = 0; k < t->count; ++k) {
      const std::optional<int64_t> x = t->Element(k).AsInt();
      if (!x || *x < INT32_MIN || *x > INT32_MAX)
        return BadKey("tokenizer.ggml.token_type", "holds a huge value");
      v.token_types.push_back(static_cast<int32_t>(*x));
    }
  }
  if (const GgufValue* s = f.Find("tokenizer.ggml.scores")) {
    if (s->type != GgufType::kArray || GgufScalarSize(s->elem_type) == 0 ||
        s->elem_type == GgufType::kBool) {
      return BadKey("tokenizer.ggml.scores", "must be an array of numbers");
    }
    v.scores.reserve(s->count);
    for (uint64_t k = 0; k < s->count; ++k)
      v.scores.push_back(static_cast<float>(*s->Element(k).AsDouble()));
  }
  struct IdKey {
    const char* key;
    int64_t* out;
  };
  for (const IdKey& id : {IdKey{"tokenizer.ggml.bos_token_id", &v.bos_id},
                          IdKey{"tokenizer.ggml.eos_token_id", &v.eos_id},
                          IdKey{"tokenizer.ggml.unknown_token_id", &v.unk_id},
                          IdKey{"tokenizer.ggml.padding_token_id", &v.pad_id},
                          IdKey{"tokenizer.ggml.eot_token_id", &v.eot_id}}) {
    ASSIGN_OR_RETURN(std::optional<int64_t> x, OptInt(f, id.key));
    if (x) *id.out = *x;
  }
  ASSIGN_OR_RETURN(v.add_bos, OptBool(f, "tokenizer.ggml.add_bos_token"));
  ASSIGN_OR_RETURN(v.add_eos, OptBool(f, "tokenizer.ggml.add_eos_token"));
  ASSIGN_OR_RETURN(v.add_space_prefix, OptBool(f, "tokenizer.ggml.add_space_prefix"));
  return v;
}

absl::StatusOr<Checkpoint> OpenGgufCheckpoint(const std::string& path) {
  auto with_path = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  };
  ASSIGN_OR_RETURN(MappedFile mf, MapFileReadOnly(path));
  absl::StatusOr<GgufFile> parsed = ParseGguf(mf.data, mf.size, mf.storage);
  if (!parsed.ok()) return with_path(parsed.status());
  auto file = std::make_shared<const GgufFile>(*std::move(parsed));
  Checkpoint ckpt;
  absl::StatusOr<ModelConfig> config = GgufModelConfig(*file);
  if (!config.ok()) return with_path(config.status());
  ckpt.config = *std::move(config);
  // GGUF carries no sampling defaults: greedy, stopping on the vocabulary's end-of-generation ids.
  ckpt.generation.bos_token_id = ckpt.config.bos_token_id;
  ckpt.generation.eos_token_ids = ckpt.config.eos_token_ids;
  absl::StatusOr<std::unique_ptr<WeightSource>> weights = GgufWeights(file, ckpt.config);
  if (!weights.ok()) return with_path(weights.status());
  ckpt.weights = *std::move(weights);

  absl::StatusOr<GgufVocab> vocab = GgufVocabFromMetadata(*file);
  if (!vocab.ok() && vocab.status().code() != absl::StatusCode::kNotFound)
    return with_path(vocab.status());
  if (vocab.ok()) {
    // A vocabulary the tokenizer cannot reproduce leaves the model usable with --tokenizer FILE.
    absl::StatusOr<HfTokenizerTexts> texts = HfTokenizerFromGguf(*vocab);
    if (texts.ok()) {
      ckpt.embedded_tokenizer_json = std::move(texts->tokenizer_json);
      ckpt.embedded_tokenizer_config_json = std::move(texts->tokenizer_config_json);
    } else {
      SPC_LOG(WARNING) << "GGUF tokenizer not usable; pass --tokenizer" << Kv("path", path)
                       << Kv("reason", texts.status().message());
    }
  }
  return ckpt;
}

}  // namespace specontext
