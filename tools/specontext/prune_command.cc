// `specontext prune`: writes a retrieval head (DESIGN.md §5) from an EAGLE-3 draft checkpoint or from the
// first attention layer of a small model sharing the tokenizer, and reports the parameters kept.
#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/cli/args.h"
#include "core/io/weight_source.h"
#include "core/sparse/retrieval_head.h"
#include "core/status_macros.h"
#include "tools/specontext/commands.h"

namespace specontext {
namespace {

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
    return absl::InvalidArgumentError(absl::StrCat("--kind must be eagle3 or layer, got \"", kind_name, "\""));
  }
  const std::string target_dir = args.GetString("target");
  auto target = OpenCheckpoint(target_dir);
  if (!target.ok()) {
    return absl::Status(target.status().code(), absl::StrCat("--target ", target_dir, ": ", target.status().message()));
  }
  std::string name = std::filesystem::path(target_dir).filename().string();
  if (name.empty()) name = std::filesystem::path(target_dir).parent_path().filename().string();
  auto report = PruneToRetrievalHead(args.GetString("source"), kind, target->config, name, args.GetString("out"));
  if (!report.ok()) return report.status();
  const double kept = report->parameters_before > 0
                          ? 100.0 * report->parameters_after / report->parameters_before : 0.0;
  std::printf("%s", absl::StrFormat("retrieval head (%s) written to %s\nparameters before: %d\nparameters after:  "
                                    "%d (%.2f%% kept, %.2f%% removed)\n",
                                    kind_name, args.GetString("out"), report->parameters_before,
                                    report->parameters_after, kept, 100.0 - kept)
                        .c_str());
  return absl::OkStatus();
}

}  // namespace

int PruneMain(int argc, char** argv) {
  Args args;
  args.Define({"source", "DLM checkpoint directory (EAGLE-3 draft, or an HF model for --kind layer)"});
  args.Define({"kind", "eagle3 or layer"});
  args.Define({"target", "target model directory (its config decides the head's fit)"});
  args.Define({"out", "output directory of the retrieval head"});
  return RunCommand("specontext prune", args, argc, argv, 2, RunPrune);
}

}  // namespace specontext
