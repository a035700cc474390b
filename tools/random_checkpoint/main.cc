// specontext-random-checkpoint: writes a random HF checkpoint with a preset's real shapes.
//   specontext-random-checkpoint --preset=llama-3.1-8b --out=/tmp/l8b [--dtype=bf16] [--seed=0]
//   specontext-random-checkpoint --eagle3_for=llama-3.1-8b --out=/tmp/l8b-eagle3   (an EAGLE-3 draft for it)
//       [--eagle3_layout=specforge|safeailab|eagle3.1|speculators]  (each publisher's real files and config)
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "core/io/weight_source.h"
#include "tools/random_checkpoint/random_checkpoint.h"

ABSL_FLAG(std::string, preset, "", "model shape preset (see --help)");
ABSL_FLAG(std::string, out, "", "output directory");
ABSL_FLAG(std::string, eagle3_for, "",
          "write an EAGLE-3 draft checkpoint for this preset (after the overrides) instead of the model");
ABSL_FLAG(std::string, eagle3_layout, "specforge",
          "layout of the --eagle3_for draft: specforge (lmsys/sglang-EAGLE3-*, model.safetensors), safeailab "
          "(yuhuili/EAGLE3-*, pytorch_model.bin f16), eagle3.1 (SpecForge with fc_norm) or speculators (vLLM)");
ABSL_FLAG(std::string, dtype, "", "stored dtype: bf16, f16 or f32 (default bf16; an EAGLE-3 draft: its publisher's)");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(int64_t, layers, 0, "override num_hidden_layers");
ABSL_FLAG(int64_t, hidden, 0, "override hidden_size");
ABSL_FLAG(int64_t, intermediate, 0, "override intermediate_size");
ABSL_FLAG(int64_t, heads, 0, "override num_attention_heads");
ABSL_FLAG(int64_t, kv_heads, 0, "override num_key_value_heads");
ABSL_FLAG(int64_t, head_dim, 0, "override head_dim (default: keep the preset's, or hidden/heads if hidden/heads changed)");
ABSL_FLAG(int64_t, vocab, 0, "override vocab_size (bos/eos move to the last two ids when they no longer fit)");
ABSL_FLAG(int64_t, max_position_embeddings, 0, "override max_position_embeddings");
ABSL_FLAG(int64_t, shard_size_mb, 4096, "shard the weights (with an index json) past this many MiB per file");
ABSL_FLAG(int64_t, tokenizer_vocab, 0, "tokenizer.json size (0: vocab_size; at most vocab_size)");
ABSL_FLAG(int, threads, 0, "writer threads (0: all cores)");

namespace {

int Fail(const std::string& msg) {
  std::fprintf(stderr, "specontext-random-checkpoint: %s\n", msg.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace specontext;
  absl::SetProgramUsageMessage("Writes a random HF checkpoint with real model shapes. Presets: " +
                               absl::StrJoin(RandomCheckpointPresetNames(), ", "));
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) return Fail(std::string("unexpected argument ") + rest[1]);
  const std::string eagle3_for = absl::GetFlag(FLAGS_eagle3_for);
  if (!eagle3_for.empty() && !absl::GetFlag(FLAGS_preset).empty()) return Fail("give --preset or --eagle3_for, not both");
  const std::string preset_name = eagle3_for.empty() ? absl::GetFlag(FLAGS_preset) : eagle3_for;
  if (preset_name.empty()) {
    return Fail("--preset (or --eagle3_for) is required (" + absl::StrJoin(RandomCheckpointPresetNames(), ", ") + ")");
  }
  if (absl::GetFlag(FLAGS_out).empty()) return Fail("--out is required");
  absl::StatusOr<ModelConfig> preset = RandomCheckpointPreset(preset_name);
  if (!preset.ok()) return Fail(std::string(preset.status().message()));
  ModelConfig c = *preset;

  RandomCheckpointOptions opt;
  absl::StatusOr<Eagle3Layout> layout = ParseEagle3Layout(absl::GetFlag(FLAGS_eagle3_layout));
  if (!layout.ok()) return Fail(std::string(layout.status().message()));
  std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype.empty()) dtype = !eagle3_for.empty() && Eagle3LayoutDType(*layout) == DType::kF16 ? "f16" : "bf16";
  if (dtype == "bf16") {
    opt.dtype = DType::kBF16;
  } else if (dtype == "f16") {
    opt.dtype = DType::kF16;
  } else if (dtype == "f32") {
    opt.dtype = DType::kF32;
  } else {
    return Fail("--dtype must be bf16, f16 or f32, got \"" + dtype + "\"");
  }
  struct Override {
    const char* flag;
    int64_t value;
    int64_t* field;
  };
  const bool heads_or_hidden = absl::GetFlag(FLAGS_heads) != 0 || absl::GetFlag(FLAGS_hidden) != 0;
  for (const Override& o : {Override{"layers", absl::GetFlag(FLAGS_layers), &c.num_hidden_layers},
                            Override{"hidden", absl::GetFlag(FLAGS_hidden), &c.hidden_size},
                            Override{"intermediate", absl::GetFlag(FLAGS_intermediate), &c.intermediate_size},
                            Override{"heads", absl::GetFlag(FLAGS_heads), &c.num_attention_heads},
                            Override{"kv_heads", absl::GetFlag(FLAGS_kv_heads), &c.num_key_value_heads},
                            Override{"head_dim", absl::GetFlag(FLAGS_head_dim), &c.head_dim},
                            Override{"vocab", absl::GetFlag(FLAGS_vocab), &c.vocab_size},
                            Override{"max_position_embeddings", absl::GetFlag(FLAGS_max_position_embeddings),
                                     &c.max_position_embeddings}}) {
    if (o.value < 0) return Fail(std::string("--") + o.flag + " must be positive");
    if (o.value > 0) *o.field = o.value;
  }
  if (heads_or_hidden && absl::GetFlag(FLAGS_head_dim) == 0 && c.num_attention_heads > 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (absl::GetFlag(FLAGS_kv_heads) == 0 && c.num_attention_heads % c.num_key_value_heads != 0) {
    c.num_key_value_heads = c.num_attention_heads;
  }
  if (c.bos_token_id >= c.vocab_size || (!c.eos_token_ids.empty() && c.eos_token_ids[0] >= c.vocab_size)) {
    c.bos_token_id = c.vocab_size - 2;
    c.eos_token_ids = {c.vocab_size - 1};
  }
  if (absl::GetFlag(FLAGS_shard_size_mb) <= 0) return Fail("--shard_size_mb must be > 0");
  opt.shard_size_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_shard_size_mb)) << 20;
  opt.seed = absl::GetFlag(FLAGS_seed);
  opt.tokenizer_vocab = absl::GetFlag(FLAGS_tokenizer_vocab);
  opt.num_threads = absl::GetFlag(FLAGS_threads);
  uint64_t bytes = 0;
  if (eagle3_for.empty()) {
    for (const ExpectedTensor& e : ExpectedTensors(c)) bytes += NumElements(e.shape) * DTypeSize(opt.dtype);
  } else {
    for (const TensorSpec& t : Eagle3DraftTensors(Eagle3DraftShapeFor(c, *layout), opt.dtype, *layout)) {
      bytes += t.nbytes();
    }
  }
  opt.progress = bytes > (256u << 20);

  absl::Status s = eagle3_for.empty() ? WriteRandomCheckpoint(c, absl::GetFlag(FLAGS_out), opt)
                                      : WriteRandomEagle3Draft(c, absl::GetFlag(FLAGS_out), opt, *layout);
  if (!s.ok()) return Fail(std::string(s.message()));
  std::fprintf(stderr, "specontext-random-checkpoint: wrote %s (%s%s, %.1f MB of weights)\n",
               absl::GetFlag(FLAGS_out).c_str(), eagle3_for.empty() ? "" : "EAGLE-3 draft for ", preset_name.c_str(),
               bytes / 1e6);
  return 0;
}
