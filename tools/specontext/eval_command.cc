// `specontext eval`: task accuracy (--tasks) and long-generation fidelity (--fidelity --prompts) through the
// Engine, dense and sparse at several budgets, with continuous batching (docs/accuracy.md). Results go to a
// JSON Lines file as they complete (one line per task and setting), summaries to that file and stdout, a
// progress line to stderr.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <cstdio>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/eval/fidelity.h"
#include "core/eval/task_eval.h"
#include "core/runtime/runtime.h"
#include "core/runtime/sparse_runtime.h"
#include "core/status_macros.h"
#include "tools/specontext/commands.h"
#include "tools/specontext/eval_report.h"
#include "tools/specontext/eval_run.h"
#include "tools/specontext/sparse_flags.h"

namespace specontext {
namespace {

using json = nlohmann::ordered_json;

void DefineEvalFlags(Args& args) {
  args.Define({"model", "HF model directory, GGUF file or llama2.c .bin checkpoint"});
  args.Define({"tokenizer", "tokenizer.json or llama2.c tokenizer .bin (default: the model's)"});
  args.Define({"tasks", "task file (JSON Lines, docs/accuracy.md): score each task's output"});
  args.Define({"fidelity", "long-generation fidelity: compare greedy continuations with the dense ones", true});
  args.Define({"prompts", "--fidelity: prompt file (JSON Lines: id, prompt or messages, ...)"});
  args.Define({"max-new-tokens", "--fidelity: tokens to generate per prompt unless its line says", false, false,
               "1024"});
  args.Define({"ignore-eos", "--fidelity: generate the full length past end-of-sequence tokens", true});
  args.Define({"budgets", "sparse: comma list of budgets to evaluate, e.g. 128,256,512,1024,2048 (default: 2048)"});
  args.Define({"dense", "sparse: also run the dense setting (without --sparse only dense runs)", true});
  args.Define({"out", "results file (JSON Lines), required"});
  args.Define({"max-batch", "requests decoding at once (continuous batching)", false, false, "8"});
  args.Define({"limit", "evaluate only the first N tasks or prompts (0 = all)", false, false, "0"});
  args.Define({"chat-template", "format of chat messages: auto (the model's), llama3, chatml, qwen3, deepseek-r1",
               false, false, "auto"});
  args.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  args.Define({"gpu-memory-limit", "cap on device memory, e.g. 4GiB (0 = all)", false, false, "0"});
  args.Define({"threads", "CPU threads (0 = the CPUs this process may use)", false, false, "0"});
  args.Define({"log-level", "debug, info, warning or error", false, false, "warning"});
  DefineSparseFlags(args);
  DefineCudaGraphsFlag(args);
  DefineBatchInvariantFlag(args);
}

// The flags, checked before anything is loaded so that a bad command fails at once.
struct EvalPlan {
  bool fidelity = false;
  std::string file;  // --tasks or --prompts
  std::vector<EvalTask> tasks;
  std::optional<SparseRuntimeOptions> sparse;
  std::vector<EvalSetting> settings;  // dense first, then budgets ascending
  int32_t max_batch = 8;
  int32_t max_new_tokens = 0;  // fidelity default
  bool ignore_eos = false;
  std::string out;
};

absl::StatusOr<EvalPlan> PlanFromArgs(const Args& args, int64_t gpu_memory_limit) {
  EvalPlan p;
  p.fidelity = args.GetBool("fidelity");
  const char* file_flag = p.fidelity ? "prompts" : "tasks";
  const char* other_flag = p.fidelity ? "tasks" : "prompts";
  if (!args.Has(file_flag)) {
    return absl::InvalidArgumentError(p.fidelity ? "--fidelity needs --prompts FILE" : "give --tasks FILE (or --fidelity --prompts FILE)");
  }
  if (args.Has(other_flag)) {
    return absl::InvalidArgumentError(p.fidelity ? "--tasks does not go with --fidelity (use --prompts)"
                                                 : "--prompts needs --fidelity");
  }
  if (!p.fidelity && (args.Has("max-new-tokens") || args.GetBool("ignore-eos"))) {
    return absl::InvalidArgumentError("--max-new-tokens and --ignore-eos are for --fidelity (tasks set their own)");
  }
  if (!args.Has("out")) return absl::InvalidArgumentError("--out FILE is required (the results, JSON Lines)");
  p.out = args.GetString("out");
  p.file = args.GetString(file_flag);
  if (args.Has("budget")) return absl::InvalidArgumentError("eval takes --budgets LIST (not --budget)");
  ASSIGN_OR_RETURN(p.sparse, SparseOptionsFromArgs(args, gpu_memory_limit));
  const bool dense = args.GetBool("dense");
  if (!p.sparse && (args.Has("budgets") || dense)) {
    return absl::InvalidArgumentError("--budgets and --dense need --sparse (without it only dense runs)");
  }
  std::vector<int64_t> budgets;
  if (args.Has("budgets")) {
    ASSIGN_OR_RETURN(budgets, args.GetPositiveIntList("budgets"));
  } else if (p.sparse) {
    budgets = {p.sparse->budget};
  }
  std::sort(budgets.begin(), budgets.end());
  budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
  if (!p.sparse || dense) p.settings.push_back(EvalSetting{});
  for (int64_t b : budgets) {
    if (b > (int64_t{1} << 30)) return absl::InvalidArgumentError(absl::StrCat("--budgets: ", b, " is too large"));
    p.settings.push_back(EvalSetting{false, static_cast<int32_t>(b)});
  }
  ASSIGN_OR_RETURN(int64_t max_batch, args.GetInt("max-batch"));
  if (max_batch < 1 || max_batch > 4096) return absl::InvalidArgumentError("--max-batch must be in [1, 4096]");
  p.max_batch = static_cast<int32_t>(max_batch);
  ASSIGN_OR_RETURN(int64_t max_new, args.GetInt("max-new-tokens"));
  if (max_new < 1 || max_new > kMaxTaskNewTokens) {
    return absl::InvalidArgumentError(absl::StrCat("--max-new-tokens must be in [1, ", kMaxTaskNewTokens, "]"));
  }
  p.max_new_tokens = static_cast<int32_t>(max_new);
  p.ignore_eos = args.GetBool("ignore-eos");
  ASSIGN_OR_RETURN(int64_t limit, args.GetInt("limit"));
  if (limit < 0) return absl::InvalidArgumentError("--limit must be >= 0");
  ASSIGN_OR_RETURN(p.tasks, ReadEvalTasks(p.file, p.fidelity ? TaskFileKind::kPrompts : TaskFileKind::kTasks));
  if (limit > 0 && static_cast<int64_t>(p.tasks.size()) > limit) p.tasks.resize(limit);
  return p;
}

absl::Status RunEval(const Args& args) {
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  ASSIGN_OR_RETURN(EvalPlan plan, PlanFromArgs(args, ro.gpu_memory_limit));
  // Refuse an unwritable --out before loading anything; the file itself is replaced only once the run starts.
  {
    const std::filesystem::path dir = std::filesystem::absolute(plan.out).parent_path();
    if (!std::filesystem::is_directory(dir) || access(dir.c_str(), W_OK) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("--out ", plan.out, ": ", dir.string(), " is not a writable directory"));
    }
  }

  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  const int64_t context = rt.model->config().max_position_embeddings;
  SparseRuntime srt;
  EngineOptions eo;
  eo.max_batch = plan.max_batch;
  if (plan.sparse) {
    int32_t largest = 1, smallest = INT32_MAX;
    for (const EvalSetting& s : plan.settings) {
      if (s.dense) continue;
      if (s.budget > context) {
        return absl::InvalidArgumentError(
            absl::StrCat("--budgets: ", s.budget, " exceeds the model's context of ", context, " tokens"));
      }
      largest = std::max(largest, s.budget);
      smallest = std::min(smallest, s.budget);
    }
    // The decoder's default budget (and its memory plan) is the largest one; every request names its own.
    plan.sparse->budget = largest;
    if (plan.sparse->sink > smallest) {
      return absl::InvalidArgumentError(
          absl::StrCat("--sink ", plan.sparse->sink, " exceeds the smallest budget of --budgets, ", smallest));
    }
    ASSIGN_OR_RETURN(srt, MakeSparseRuntime(rt, *plan.sparse));
    eo.sparse = srt.decoder;
  }
  std::optional<ChatTemplate> chat;
  if (std::any_of(plan.tasks.begin(), plan.tasks.end(), [](const EvalTask& t) { return t.chat(); })) {
    absl::StatusOr<ChatTemplate> tmpl = ResolveChatTemplate(args.GetString("chat-template"), rt);
    if (!tmpl.ok()) {
      return absl::Status(tmpl.status().code(),
                          absl::StrCat(plan.file, " has chat messages but --chat-template ",
                                       args.GetString("chat-template"), " gives no template: ", tmpl.status().message()));
    }
    chat = *tmpl;
  }
  ASSIGN_OR_RETURN(std::vector<std::vector<int32_t>> prompts,
                   EncodeTaskPrompts(rt, chat ? &*chat : nullptr, plan.tasks, plan.file, context,
                                     plan.fidelity ? plan.max_new_tokens : 0));
  Engine engine(rt.model.get(), rt.tokenizer.get(), eo);
  BatchRunner runner(&engine, srt.decoder.get());
  ASSIGN_OR_RETURN(JsonlWriter out, JsonlWriter::Open(plan.out));

  json header = {{"type", "run"},
                 {"mode", plan.fidelity ? "fidelity" : "tasks"},
                 {"file", plan.file},
                 {"items", plan.tasks.size()},
                 {"model", ro.model_path},
                 {"retrieval_head", plan.sparse ? json(plan.sparse->retrieval_head) : json(nullptr)},
                 {"sink", plan.sparse ? json(plan.sparse->sink) : json(nullptr)},
                 {"selection_source", plan.sparse ? json(plan.sparse->selection_source) : json(nullptr)},
                 {"fallback_mass", plan.sparse ? json(plan.sparse->fallback_mass) : json(nullptr)},
                 {"backend", rt.backend->name()},
                 {"threads", ro.threads},
                 {"max_batch", plan.max_batch},
                 {"date", absl::FormatTime("%Y-%m-%dT%H:%M:%S%Ez", absl::Now(), absl::LocalTimeZone())}};
  json settings = json::array();
  for (const EvalSetting& s : plan.settings) settings.push_back(SettingJson(s));
  header["settings"] = settings;
  RETURN_IF_ERROR(out.Write(header));
  const EvalInputs in{plan.file, plan.tasks, prompts, plan.settings, plan.max_batch};
  if (plan.fidelity) return RunFidelitySettings(in, plan.max_new_tokens, plan.ignore_eos, runner, out);
  return RunTaskSettings(in, runner, out);
}

}  // namespace

int EvalMain(int argc, char** argv) {
  Args args;
  DefineEvalFlags(args);
  return RunCommand("specontext eval", args, argc, argv, 2, RunEval);
}

}  // namespace specontext
