// `specontext prune`: writes a retrieval head (DESIGN.md §5) from an EAGLE-3 draft checkpoint, as
// SafeAILab, SpecForge/SGLang/ModelOpt or vLLM speculators ship it (core/sparse/eagle3_draft.h), or
// from the first attention layer of a small model sharing the tokenizer; prints what it read and
// chose, and the parameters kept.
#include <cstdio>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/cli/args.h"
#include "core/io/weight_source.h"
#include "core/sparse/retrieval_head.h"
#include "core/status_macros.h"
#include "tools/specontext/commands.h"

namespace specontext {
namespace {

absl::StatusOr<std::optional<double>> OptDouble(const Args& args, const char* flag) {
  if (!args.Has(flag)) return std::optional<double>();
  ASSIGN_OR_RETURN(double v, args.GetDouble(flag));
  return std::optional<double>(v);
}

absl::StatusOr<PruneOptions> Options(const Args& args) {
  PruneOptions o;
  ASSIGN_OR_RETURN(o.rope_theta, OptDouble(args, "rope-theta"));
  if (args.Has("yarn-factor")) {
    if (args.GetString("yarn-factor") == "auto") {
      o.yarn_auto = true;
    } else {
      ASSIGN_OR_RETURN(o.yarn_factor, OptDouble(args, "yarn-factor"));
    }
  }
  if (args.Has("original-max-position")) {
    ASSIGN_OR_RETURN(int64_t v, args.GetInt("original-max-position"));
    o.original_max_position = v;
  }
  ASSIGN_OR_RETURN(o.yarn_beta_fast, OptDouble(args, "yarn-beta-fast"));
  ASSIGN_OR_RETURN(o.yarn_beta_slow, OptDouble(args, "yarn-beta-slow"));
  ASSIGN_OR_RETURN(o.yarn_attention_factor, OptDouble(args, "yarn-attention-factor"));
  if (args.Has("fusion-layers")) {
    std::vector<int64_t> layers;
    for (absl::string_view part : absl::StrSplit(args.GetString("fusion-layers"), ',')) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(part, &v) || v < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("--fusion-layers must be three non-negative layer ids, got \"",
                         args.GetString("fusion-layers"), "\""));
      }
      layers.push_back(v);
    }
    o.fusion_layers = layers;
  }
  if (args.Has("publisher")) {
    ASSIGN_OR_RETURN(DraftPublisher p, ParseDraftPublisher(args.GetString("publisher")));
    o.publisher = p;
  }
  return o;
}

absl::Status RunPrune(const Args& args) {
  for (const char* f : {"source", "kind", "target", "out"}) {
    if (!args.Has(f)) return absl::InvalidArgumentError(absl::StrCat("--", f, " is required"));
  }
  const std::string kind_name = args.GetString("kind");
  RetrievalHeadKind kind;
  if (kind_name == "eagle3") {
    kind = RetrievalHeadKind::kEagle3;
  } else if (kind_name == "layer") {
    kind = RetrievalHeadKind::kLayer;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--kind must be eagle3 or layer, got \"", kind_name, "\""));
  }
  ASSIGN_OR_RETURN(PruneOptions options, Options(args));
  const std::string target_dir = args.GetString("target");
  auto target = OpenCheckpoint(target_dir);
  if (!target.ok()) {
    return absl::Status(target.status().code(),
                        absl::StrCat("--target ", target_dir, ": ", target.status().message()));
  }
  std::string name = std::filesystem::path(target_dir).filename().string();
  if (name.empty()) name = std::filesystem::path(target_dir).parent_path().filename().string();
  const std::string source = args.GetString("source");
  auto report =
      PruneToRetrievalHead(source, kind, target->config, name, args.GetString("out"), options);
  if (!report.ok()) {
    return absl::Status(report.status().code(),
                        absl::StrCat("--source ", source, ": ", report.status().message()));
  }
  std::printf("source: %s\n", report->source.c_str());
  for (const std::string& note : report->notes) std::printf("  %s\n", note.c_str());
  const double kept = report->parameters_before > 0
                          ? 100.0 * report->parameters_after / report->parameters_before
                          : 0.0;
  std::printf("%s",
              absl::StrFormat(
                  "retrieval head (%s) written to %s\nparameters before: %d\nparameters after:  "
                  "%d (%.2f%% kept, %.2f%% removed)\n",
                  kind_name, args.GetString("out"), report->parameters_before,
                  report->parameters_after, kept, 100.0 - kept)
                  .c_str());
  return absl::OkStatus();
}

}  // namespace

int PruneMain(int argc, char** argv) {
  Args args;
  args.Define({"source",
               "DLM checkpoint directory: an EAGLE-3 draft (model.safetensors[.index.json] or "
               "pytorch_model.bin[.index.json] + config.json), or an HF model for --kind layer"});
  args.Define({"kind", "eagle3 or layer"});
  args.Define({"target", "target model directory (its config decides the head's fit)"});
  args.Define({"out", "output directory of the retrieval head"});
  args.Define({"publisher",
               "eagle3: the draft's layout, when detection is wrong: safeailab, specforge (sglang, "
               "modelopt) or speculators (vllm)"});
  args.Define({"fusion-layers",
               "eagle3: three target layers whose INPUT hidden states feed fc (HF hidden_states "
               "indices), replacing the draft's"});
  args.Define({"rope-theta", "RoPE base (default: the publisher's; SafeAILab drafts: 10000)"});
  args.Define(
      {"yarn-factor",
       "YaRN context stretch: a factor > 1, 'auto' (target context / "
       "original-max-position) or 0 for none (default: the draft's own scaling, usually none)"});
  args.Define({"original-max-position",
               "YaRN: positions the source was trained at (default: its "
               "max_position_embeddings, 2048 for EAGLE-3 drafts)"});
  args.Define({"yarn-beta-fast", "YaRN beta_fast (default 32)"});
  args.Define({"yarn-beta-slow", "YaRN beta_slow (default 1)"});
  args.Define({"yarn-attention-factor", "YaRN attention factor (default 0.1 ln(factor) + 1)"});
  return RunCommand("specontext prune", args, argc, argv, 2, RunPrune);
}

}  // namespace specontext
