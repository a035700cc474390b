// `specontext tokenize`: token counts of prompts with a model's tokenizer and chat template, one JSON line in,
// one out (stdin to stdout, flushed per line), so that a task generator can size its prompts in the target's
// tokens (tools/eval/make_ruler_tasks.py --tokenizer-cmd). Each input line is a JSON string (a plain prompt,
// encoded with the tokenizer's default BOS as `eval` does) or an object with "prompt" or "messages" as in an
// eval prompt file (messages rendered with the chat template and the assistant's opening). Each output line is
// {"tokens": N} or {"error": "..."}.
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/cli/args.h"
#include "core/eval/task_eval.h"
#include "core/runtime/runtime.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/specontext/commands.h"

namespace specontext {
namespace {

using json = nlohmann::json;

void DefineTokenizeFlags(Args& args) {
  args.Define({"model", "HF model directory, GGUF file or llama2.c .bin checkpoint"});
  args.Define({"tokenizer", "tokenizer.json or llama2.c tokenizer .bin (default: the model's)"});
  args.Define({"chat-template", "format of chat messages: auto (the model's), llama3, chatml, qwen3, deepseek-r1",
               false, false, "auto"});
  args.Define({"backend", "cpu, cuda or auto", false, false, "cpu"});
  args.Define({"gpu-memory-limit", "cap on device memory (0 = all)", false, false, "0"});
  args.Define({"threads", "CPU threads (0 = the CPUs this process may use)", false, false, "1"});
  args.Define({"log-level", "debug, info, warning or error", false, false, "warning"});
}

// The token count of one input line.
absl::StatusOr<int64_t> CountLine(const Runtime& rt, const std::string& chat_name, std::optional<ChatTemplate>& chat,
                                  const std::string& line) {
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  if (j.is_string()) j = json{{"prompt", j}};
  if (j.is_object() && !j.contains("id")) j["id"] = "-";
  ASSIGN_OR_RETURN(std::vector<EvalTask> tasks, ParseEvalTasks(j.dump(), "stdin", TaskFileKind::kPrompts));
  if (tasks[0].chat() && !chat) {
    ASSIGN_OR_RETURN(chat, ResolveChatTemplate(chat_name, rt));
  }
  ASSIGN_OR_RETURN(auto prompts, EncodeTaskPrompts(rt, chat ? &*chat : nullptr, tasks, "stdin", INT64_MAX));
  return static_cast<int64_t>(prompts[0].size());
}

absl::Status RunTokenize(const Args& args) {
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  if (rt.tokenizer == nullptr) return absl::FailedPreconditionError("the model has no tokenizer: pass --tokenizer FILE");
  const std::string chat_name = args.GetString("chat-template");
  std::optional<ChatTemplate> chat;
  for (std::string line; std::getline(std::cin, line);) {
    absl::StatusOr<int64_t> n = CountLine(rt, chat_name, chat, line);
    const json out = n.ok() ? json{{"tokens", *n}} : json{{"error", std::string(n.status().message())}};
    std::printf("%s\n", out.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

}  // namespace

int TokenizeMain(int argc, char** argv) {
  Args args;
  DefineTokenizeFlags(args);
  return RunCommand("specontext tokenize", args, argc, argv, 2, RunTokenize);
}

}  // namespace specontext
