#include "tools/specontext/sparse_flags.h"

#include "absl/strings/str_cat.h"
#include "core/sparse/selection_source.h"
#include "core/status_macros.h"

namespace specontext {

void DefineSparseFlags(Args& args) {
  args.Define({"sparse", "SpeContext sparse decoding (needs --retrieval-head); default: dense", true});
  args.Define({"budget", "sparse: past tokens attended per KV head", false, false, "2048"});
  args.Define({"sink", "sparse: first tokens always attended", false, false, "1"});
  args.Define({"retrieval-head", "sparse: retrieval head directory (specontext prune)"});
  args.Define({"selection", "sparse: head (one index set per KV head) or batch", false, false, "head"});
  args.Define({"selection-source", "sparse: where index sets come from: head (the retrieval head), window "
               "(sink + most recent), oracle (each layer's exact top-B) or quest (each layer's Quest pages)",
               false, false, "head"});
  args.Define({"fallback-mass", "sparse, head source: a sequence whose head kept less than this attention mass "
               "attends densely in the resident layers for that step; the other sequences keep their sets and "
               "offloaded layers their selected rows (0 = off)", false, false, "0"});
}

absl::StatusOr<std::optional<SparseRuntimeOptions>> SparseOptionsFromArgs(const Args& args,
                                                                          int64_t gpu_memory_limit) {
  if (!args.GetBool("sparse")) {
    if (args.Has("retrieval-head") || args.Has("budget") || args.Has("sink") || args.Has("selection") ||
        args.Has("selection-source") || args.Has("fallback-mass")) {
      return absl::InvalidArgumentError(
          "--budget, --sink, --selection, --selection-source, --fallback-mass and --retrieval-head need --sparse");
    }
    return std::nullopt;
  }
  SparseRuntimeOptions so;
  ASSIGN_OR_RETURN(so.budget, args.GetInt("budget"));
  ASSIGN_OR_RETURN(so.sink, args.GetInt("sink"));
  so.retrieval_head = args.GetString("retrieval-head");
  so.selection = args.GetString("selection");
  so.selection_source = args.GetString("selection-source");
  ASSIGN_OR_RETURN(so.fallback_mass, args.GetDouble("fallback-mass"));
  so.gpu_memory_limit = gpu_memory_limit;
  if (so.budget < 1) return absl::InvalidArgumentError(absl::StrCat("--budget must be at least 1, got ", so.budget));
  if (!ParseSelectionSource(so.selection_source).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--selection-source must be head, window, oracle or quest, got \"",
                                                   so.selection_source, "\""));
  }
  if (so.selection_source == "head" && so.retrieval_head.empty()) {
    return absl::InvalidArgumentError("--sparse needs --retrieval-head DIR (write one with `specontext prune`)");
  }
  return so;
}

}  // namespace specontext
