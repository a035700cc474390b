// OpenCheckpoint: HF directories, GGUF files and llama2.c files, plus the shape validation they share.
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/io/gguf.h"
#include "core/io/gguf_checkpoint.h"
#include "core/io/llama2c.h"
#include "core/io/model_config.h"
#include "core/io/safetensors.h"
#include "core/io/weight_files.h"
#include "core/io/weight_source.h"
#include "core/status_macros.h"

namespace specontext {

namespace fs = std::filesystem;

std::string LayerTensorName(int layer, std::string_view suffix) {
  return absl::StrCat("model.layers.", layer, ".", std::string(suffix));
}

std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& c) {
  const int64_t d = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  std::vector<ExpectedTensor> out;
  out.push_back({"model.embed_tokens.weight", {V, d}});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto add = [&](const char* suffix, Shape shape) { out.push_back({LayerTensorName(l, suffix), std::move(shape)}); };
    add("input_layernorm.weight", {d});
    add("self_attn.q_proj.weight", {q, d});
    add("self_attn.k_proj.weight", {kv, d});
    add("self_attn.v_proj.weight", {kv, d});
    if (c.attention_bias) {
      add("self_attn.q_proj.bias", {q});
      add("self_attn.k_proj.bias", {kv});
      add("self_attn.v_proj.bias", {kv});
    }
    if (c.qk_norm) {
      add("self_attn.q_norm.weight", {c.head_dim});
      add("self_attn.k_norm.weight", {c.head_dim});
    }
    add("self_attn.o_proj.weight", {d, q});
    if (c.o_proj_bias) add("self_attn.o_proj.bias", {d});
    add("post_attention_layernorm.weight", {d});
    add("mlp.gate_proj.weight", {I, d});
    add("mlp.up_proj.weight", {I, d});
    add("mlp.down_proj.weight", {d, I});
    if (c.mlp_bias) {
      add("mlp.gate_proj.bias", {I});
      add("mlp.up_proj.bias", {I});
      add("mlp.down_proj.bias", {d});
    }
  }
  out.push_back({"model.norm.weight", {d}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {V, d}});
  return out;
}

absl::StatusOr<WeightInfo> WeightSource::Info(std::string_view name) const {
  ASSIGN_OR_RETURN(Tensor t, Get(name));
  return WeightInfo{t.dtype(), t.shape(), t.nbytes()};
}

absl::Status ValidateWeights(const ModelConfig& config, const WeightSource& weights) {
  for (const ExpectedTensor& e : ExpectedTensors(config)) {
    if (!weights.Has(e.name)) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint is missing tensor \"", e.name, "\" (expected shape ",
                                                     ShapeToString(e.shape), ")"));
    }
    ASSIGN_OR_RETURN(WeightInfo t, weights.Info(e.name));
    if (t.shape != e.shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", e.name, "\" has shape ", ShapeToString(t.shape),
                                                     " but the config implies ", ShapeToString(e.shape)));
    }
    if (!IsFloating(t.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", e.name, "\" has dtype ",
                                                     std::string(DTypeName(t.dtype)),
                                                     "; weights must be f32, f16 or bf16"));
    }
  }
  return absl::OkStatus();
}

namespace {

// fs::exists without an error_code throws on EACCES and friends; loaders never throw.
bool Exists(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}

absl::StatusOr<Checkpoint> OpenHfDirectory(const fs::path& dir) {
  Checkpoint ckpt;
  const fs::path config = dir / "config.json";
  if (!Exists(config)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir.string(), " has no config.json"));
  }
  ASSIGN_OR_RETURN(ckpt.config, LoadModelConfig(config.string()));
  const fs::path gen = dir / "generation_config.json";
  if (Exists(gen)) {
    ASSIGN_OR_RETURN(ckpt.generation, LoadGenerationConfig(gen.string()));
  } else {  // fall back to the ids of config.json
    ckpt.generation.bos_token_id = ckpt.config.bos_token_id;
    ckpt.generation.eos_token_ids = ckpt.config.eos_token_ids;
  }
  // Whichever weight files the publisher shipped: safetensors (single or sharded) or torch.save archives.
  ASSIGN_OR_RETURN(WeightFiles files, OpenWeightFiles(dir.string()));
  ckpt.weights = std::move(files.weights);
  const fs::path tok = dir / "tokenizer.json";
  if (Exists(tok)) ckpt.tokenizer_path = tok.string();
  return ckpt;
}

// What a file that is neither a regular file nor a directory is, for the error that refuses it.
const char* SpecialFileKind(fs::file_type type) {
  switch (type) {
    case fs::file_type::fifo:
      return "a FIFO (named pipe)";
    case fs::file_type::socket:
      return "a socket";
    case fs::file_type::character:
      return "a character device";
    case fs::file_type::block:
      return "a block device";
    default:
      return "not a regular file";
  }
}

}  // namespace

absl::StatusOr<Checkpoint> OpenCheckpoint(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return absl::NotFoundError(absl::StrCat("checkpoint ", path, " does not exist"));
  // Opening a FIFO blocks until a writer comes (forever, for a server at startup) and a device
  // reads as an endless or empty stream: only files and HF directories are checkpoints.
  if (!fs::is_directory(st) && !fs::is_regular_file(st)) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", path, " is ", SpecialFileKind(st.type()),
                     "; a model must be a regular file or a directory"));
  }
  const fs::path p(path);
  const std::string ext = p.extension().string();
  absl::StatusOr<Checkpoint> ckpt;
  if (fs::is_directory(st)) {
    ckpt = OpenHfDirectory(p);
  } else if (FileHasGgufMagic(path) || ext == ".gguf") {  // the magic decides; a .gguf without it says so
    ckpt = OpenGgufCheckpoint(path);
  } else if (ext == ".safetensors" || ext == ".json") {  // a file of an HF directory: open the directory
    ckpt = OpenHfDirectory(p.parent_path().empty() ? fs::path(".") : p.parent_path());
  } else {
    ckpt = OpenLlama2cCheckpoint(path);
    // llama2.c keeps its tokenizer beside the model as tok<vocab>.bin or tokenizer.bin.
    if (ckpt.ok()) {
      for (const std::string name : {absl::StrCat("tok", ckpt->config.vocab_size, ".bin"), std::string("tokenizer.bin")}) {
        const fs::path tok = p.parent_path() / name;
        if (Exists(tok) && tok != p) {
          ckpt->tokenizer_path = tok.string();
          break;
        }
      }
    }
  }
  if (!ckpt.ok()) return ckpt.status();
  absl::Status valid = ValidateWeights(ckpt->config, *ckpt->weights);
  if (!valid.ok()) return absl::Status(valid.code(), absl::StrCat(path, ": ", valid.message()));
  return ckpt;
}

}  // namespace specontext
