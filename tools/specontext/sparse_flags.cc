#include "tools/specontext/sparse_flags.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {

void DefineSparseFlags(Args& args) {
  args.Define({"sparse", "SpeContext sparse decoding (needs --retrieval-head); default: dense", true});
  args.Define({"budget", "sparse: past tokens attended per KV head", false, false, "2048"});
  args.Define({"sink", "sparse: first tokens always attended", false, false, "1"});
  args.Define({"retrieval-head", "sparse: retrieval head directory (specontext prune)"});
  args.Define({"selection", "sparse: head (one index set per KV head) or batch", false, false, "head"});
}

absl::StatusOr<std::optional<SparseRuntimeOptions>> SparseOptionsFromArgs(const Args& args,
                                                                          int64_t gpu_memory_limit) {
  if (!args.GetBool("sparse")) {
    if (args.Has("retrieval-head") || args.Has("budget") || args.Has("sink") || args.Has("selection")) {
      return absl::InvalidArgumentError("--budget, --sink, --selection and --retrieval-head need --sparse");
    }
    return std::nullopt;
  }
  SparseRuntimeOptions so;
  ASSIGN_OR_RETURN(so.budget, args.GetInt("budget"));
  ASSIGN_OR_RETURN(so.sink, args.GetInt("sink"));
  so.retrieval_head = args.GetString("retrieval-head");
  so.selection = args.GetString("selection");
  so.gpu_memory_limit = gpu_memory_limit;
  if (so.budget < 1) return absl::InvalidArgumentError(absl::StrCat("--budget must be at least 1, got ", so.budget));
  if (so.retrieval_head.empty()) {
    return absl::InvalidArgumentError("--sparse needs --retrieval-head DIR (write one with `specontext prune`)");
  }
  return so;
}

}  // namespace specontext
