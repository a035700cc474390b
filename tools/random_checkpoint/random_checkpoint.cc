// Writes random checkpoints: HF-init-like weights streamed to (sharded) safetensors by all cores.
#include "tools/random_checkpoint/random_checkpoint.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/io/torch_zip_writer.h"
#include "core/io/weight_source.h"
#include "core/parallel/cpu_limits.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t HashName(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// What a tensor's values look like: HF init draws matrices from N(0, 0.02), norms start at 1.
enum class Init { kMatrix, kNorm, kBias };
Init InitOf(const std::string& name) {
  if (name.find("norm") != std::string::npos) return Init::kNorm;
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) return Init::kBias;
  return Init::kMatrix;
}

// Fills [first, first+count) of one tensor. Each element's value depends only on (seed, name, index)
// through a per-element counter hash, so chunking and threads never change the result.
void FillRandom(const TensorSpec& spec, uint64_t seed, int64_t first, int64_t count, void* dst) {
  if (!IsFloating(spec.dtype)) {  // integer / bool buffers: zeros (RandomCheckpointOptions::special_fill)
    std::memset(dst, 0, DTypeBytes(spec.dtype, static_cast<uint64_t>(count)));
    return;
  }
  const Init init = InitOf(spec.name);
  const float std = init == Init::kMatrix ? 0.02f : init == Init::kNorm ? 0.05f : 0.02f;
  const float mean = init == Init::kNorm ? 1.0f : 0.0f;
  // Irwin-Hall(4) of 16-bit uniforms: mean 2, variance 1/3 -> scaled to N(0,1)-like on [-3.46, 3.46].
  const float scale = std * std::sqrt(3.0f) / 65536.0f;
  const float offset = mean - std * 2.0f * std::sqrt(3.0f);
  const uint64_t base = seed * 0x2545f4914f6cdd1dull ^ HashName(spec.name);
  float tmp[1024];
  for (int64_t done = 0; done < count; done += 1024) {
    const int64_t n = std::min<int64_t>(1024, count - done);
    for (int64_t i = 0; i < n; ++i) {
      uint64_t state = base + static_cast<uint64_t>(first + done + i) * 0x9e3779b97f4a7c15ull;
      const uint64_t r = SplitMix64(state);
      const uint32_t s = static_cast<uint32_t>(r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
      tmp[i] = static_cast<float>(s) * scale + offset;
    }
    ConvertFromF32(tmp, spec.dtype, static_cast<uint8_t*>(dst) + done * DTypeSize(spec.dtype), n);
  }
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

std::string TorchDtypeName(DType d) {
  return d == DType::kF32 ? "float32" : d == DType::kF16 ? "float16" : "bfloat16";
}

}  // namespace

absl::Status WriteRandomCheckpoint(const ModelConfig& config_in, const std::string& out_dir,
                                   const RandomCheckpointOptions& opt) {
  if (!IsFloating(opt.dtype)) return absl::InvalidArgumentError("random checkpoint dtype must be f32, f16 or bf16");
  ModelConfig config = config_in;
  config.torch_dtype = TorchDtypeName(opt.dtype);
  const std::string config_json = ModelConfigToJson(config);
  {  // Validate by parsing what we are about to write.
    absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config_json);
    if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat("invalid model config: ", parsed.status().message()));
  }
  const int64_t tok_vocab = opt.tokenizer_vocab == 0 ? config.vocab_size : opt.tokenizer_vocab;
  if (tok_vocab < 0 || tok_vocab > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer vocab ", tok_vocab, " must be in (0, vocab_size ",
                                                   config.vocab_size, "]"));
  }
  if (opt.shard_size_bytes == 0) return absl::InvalidArgumentError("shard size must be > 0");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  const fs::path dir(out_dir);

  RETURN_IF_ERROR(WriteText(dir / "config.json", config_json));
  json gen = {{"_from_model_config", false}, {"do_sample", true}, {"temperature", 0.6}, {"top_p", 0.9}};
  if (config.bos_token_id >= 0) gen["bos_token_id"] = config.bos_token_id;
  if (!config.eos_token_ids.empty()) gen["eos_token_id"] = config.eos_token_ids;
  RETURN_IF_ERROR(WriteText(dir / "generation_config.json", gen.dump(2) + "\n"));
  if (opt.write_tokenizer) {
    std::vector<SpecialToken> specials;
    for (const SpecialToken& s : DefaultSpecialTokens(config)) {
      if (s.id < tok_vocab) specials.push_back(s);
    }
    const std::string bos = config.arch == Architecture::kLlama && !specials.empty() &&
                                    specials[0].id == config.bos_token_id
                                ? specials[0].content
                                : "";
    ASSIGN_OR_RETURN(std::string tok, MakeByteLevelBpeTokenizerJson(tok_vocab, specials, bos));
    RETURN_IF_ERROR(WriteText(dir / "tokenizer.json", tok));
    // tokenizer_config.json lets transformers' AutoTokenizer pick the fast tokenizer and its specials.
    json tc = {{"tokenizer_class", "PreTrainedTokenizerFast"},
               {"model_max_length", config.max_position_embeddings},
               {"clean_up_tokenization_spaces", false}};
    for (const SpecialToken& s : specials) {
      if (s.id == config.bos_token_id) tc["bos_token"] = s.content;
      if (!config.eos_token_ids.empty() && s.id == config.eos_token_ids[0]) tc["eos_token"] = s.content;
    }
    RETURN_IF_ERROR(WriteText(dir / "tokenizer_config.json", tc.dump(2) + "\n"));
  }

  std::vector<TensorSpec> specs;
  for (const ExpectedTensor& e : ExpectedTensors(config)) specs.push_back({e.name, opt.dtype, e.shape});
  return WriteRandomTensors(std::move(specs), out_dir, opt);
}

absl::Status WriteRandomTensors(std::vector<TensorSpec> specs, const std::string& out_dir,
                                const RandomCheckpointOptions& opt) {
  if (opt.shard_size_bytes == 0) return absl::InvalidArgumentError("shard size must be > 0");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  const fs::path dir(out_dir);
  // Stale weights from an earlier run would shadow (index) or contradict the new ones.
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == "model.safetensors.index.json" || name == "pytorch_model.bin.index.json" ||
        (name.rfind("model", 0) == 0 && entry.path().extension() == ".safetensors") ||
        (name.rfind("pytorch_model", 0) == 0 && entry.path().extension() == ".bin")) {
      fs::remove(entry.path(), ec);
    }
  }
  if (opt.edit_specs) opt.edit_specs(&specs);

  const bool torch = opt.format == WeightsFormat::kPytorchBin;
  // torch.save archives stay below 4 GiB (no ZIP64 in the writer): shards of at most 2 GiB.
  const uint64_t shard_bytes = torch ? std::min<uint64_t>(opt.shard_size_bytes, 2048ull << 20) : opt.shard_size_bytes;
  // Greedy sharding in load order; a tensor larger than a shard gets a shard of its own.
  std::vector<std::vector<size_t>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t b = specs[i].nbytes();
    if (!shards.back().empty() && in_shard + b > shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += b;
    total += b;
  }
  // The CPUs this process may use (affinity, cgroup quota), not the node's: a pod limited to 2 of 64 cores
  // would otherwise start 64 generator threads.
  const int threads = opt.num_threads > 0 ? opt.num_threads : DefaultCpuThreads();
  const auto start = std::chrono::steady_clock::now();
  uint64_t before = 0;
  int last_pct = -1;
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file =
        torch ? (shards.size() == 1 ? "pytorch_model.bin"
                                    : absl::StrFormat("pytorch_model-%05d-of-%05d.bin", s + 1, shards.size()))
              : (shards.size() == 1 ? "model.safetensors"
                                    : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size()));
    std::vector<TensorSpec> shard_specs;
    for (size_t i : shards[s]) {
      shard_specs.push_back(specs[i]);
      weight_map[specs[i].name] = file;
    }
    auto fill = [&](size_t i, int64_t first, int64_t count, void* dst) {
      if (opt.special_fill && opt.special_fill(shard_specs[i], first, count, dst)) return;
      FillRandom(shard_specs[i], opt.seed, first, count, dst);
    };
    auto progress = [&](uint64_t done, uint64_t) {
      const int pct = static_cast<int>(100.0 * static_cast<double>(before + done) / std::max<uint64_t>(total, 1));
      if (!opt.progress || pct / 5 == last_pct / 5) return;
      last_pct = pct;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "random-checkpoint: %3d%% of %.2f GB (%s, %.1f s)\n", pct, total / 1e9, file.c_str(), secs);
    };
    const std::map<std::string, std::string> meta = {{"format", "pt"}};
    if (torch) {
      RETURN_IF_ERROR(WriteTorchCheckpointStreaming((dir / file).string(), shard_specs, fill, threads, 1 << 20, progress));
    } else {
      RETURN_IF_ERROR(
          WriteSafetensorsStreaming((dir / file).string(), shard_specs, meta, fill, threads, 1 << 20, progress));
    }
    for (const TensorSpec& t : shard_specs) before += t.nbytes();
  }
  if (shards.size() > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    RETURN_IF_ERROR(WriteText(dir / (torch ? "pytorch_model.bin.index.json" : "model.safetensors.index.json"),
                              index.dump(2) + "\n"));
  }
  return absl::OkStatus();
}

}  // namespace specontext
