// `specontext generate`: streams a completion to stdout, then a one-line summary to stderr.
#include "tools/specontext/commands.h"
#include "tools/specontext/sparse_flags.h"

#include <cstdio>
#include <memory>
#include <span>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/log.h"
#include "core/model/engine.h"
#include "core/runtime/runtime.h"
#include "core/runtime/sparse_runtime.h"
#include "core/status_macros.h"
#include "core/tokenizer/chat_template.h"

namespace specontext {
namespace {

void DefineGenerateFlags(Args& args) {
  args.Define({"model", "HF model directory, GGUF file or llama2.c .bin checkpoint"});
  args.Define({"tokenizer", "tokenizer.json or llama2.c tokenizer .bin (default: beside the model)"});
  args.Define({"prompt", "prompt text; empty starts from BOS", false, false, ""});
  args.Define({"max-new-tokens", "tokens to generate at most", false, false, "128"});
  args.Define({"temperature", "0 = greedy (default: generation_config.json's when it samples, else 0)", false,
               false, "0"});
  args.Define({"top-k", "sample among the k most likely tokens; 0 = off (default: generation_config.json)",
               false, false, "0"});
  args.Define({"top-p", "nucleus sampling threshold in (0, 1] (default: generation_config.json)", false, false,
               "1"});
  args.Define({"seed", "sampling seed", false, false, "0"});
  args.Define({"stop", "stop string (repeatable)", false, true});
  args.Define({"stop-token-id", "stop token id (repeatable)", false, true});
  args.Define({"ignore-eos", "keep generating past end-of-sequence tokens", true});
  args.Define({"chat-template", "wrap the prompt as a user message: none, auto, llama3, chatml, "
                                "qwen3, deepseek-r1", false, false, "none"});
  args.Define({"system", "system message for --chat-template"});
  args.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  args.Define({"gpu-memory-limit", "cap on device memory, e.g. 4GiB (0 = all)", false, false, "0"});
  args.Define({"threads", "CPU threads (0 = the CPUs this process may use)", false, false, "0"});
  args.Define({"tensor-parallel", "ranks of tensor parallelism, one thread and model shard each (dense or sparse; "
                                  "CUDA: see --tensor-parallel-devices)", false, false, "1"});
  DefineTensorParallelDevicesFlag(args);
  DefineSparseFlags(args);
  args.Define({"log-level", "debug, info, warning or error", false, false, "warning"});
  DefineCudaGraphsFlag(args);
  DefineBatchInvariantFlag(args);
}

// Runs `req` on every tensor-parallel rank at once: rank 0 on this thread with `stream`, the others on a thread
// each. Every rank samples its own token from its own logits: the in-process all-reduce gives every rank the
// same bits, the LM head is replicated and the sampler is seeded by the request, so the ranks pick the same
// tokens and stop at the same step (checked afterwards). A rank that is done aborts the group on its way out,
// so a rank that would still wait for it fails instead of hanging. In sparse mode rank r's engine drives
// `sparse[r - 1]` (SparseRuntime::tp_decoders).
absl::StatusOr<GenerationResult> GenerateTensorParallel(Runtime& rt, Engine& rank0, const EngineOptions& eo,
                                                        std::span<const std::shared_ptr<SparseDecoder>> sparse,
                                                        GenerationRequest req, const StreamCallback& stream) {
  const int tp = static_cast<int>(rt.tp_comms.size());
  std::vector<absl::StatusOr<GenerationResult>> others(tp - 1, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  EngineOptions quiet = eo;
  quiet.prefill_progress = nullptr;
  for (int r = 1; r < tp; ++r) {
    threads.emplace_back([&, r, req] {
      if (absl::Status s = rt.tp_backends[r - 1]->MakeCurrent(); !s.ok()) {
        others[r - 1] = s;
        rt.tp_comms[r]->Abort();
        return;
      }
      EngineOptions rank_eo = quiet;
      if (eo.sparse != nullptr) rank_eo.sparse = sparse[r - 1];
      Engine engine(rt.tp_models[r - 1].get(), rt.tokenizer.get(), rank_eo);
      others[r - 1] = engine.Generate(req);
      rt.tp_comms[r]->Abort();
    });
  }
  absl::StatusOr<GenerationResult> result = rank0.Generate(std::move(req), stream);
  rt.tp_comms[0]->Abort();
  for (std::thread& t : threads) t.join();
  RETURN_IF_ERROR(result.status());
  for (int r = 1; r < tp; ++r) {
    if (!others[r - 1].ok()) {
      return absl::Status(others[r - 1].status().code(),
                          absl::StrCat("tensor-parallel rank ", r, ": ", others[r - 1].status().message()));
    }
    if (others[r - 1]->tokens != result->tokens) {
      return absl::InternalError(absl::StrCat("tensor-parallel rank ", r, " generated other tokens than rank 0"));
    }
  }
  return result;
}

absl::Status RunGenerate(const Args& args) {
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  ro.show_progress = true;
  ASSIGN_OR_RETURN(int64_t tensor_parallel, args.GetInt("tensor-parallel"));
  if (tensor_parallel < 1 || tensor_parallel > 256) {
    return absl::InvalidArgumentError("--tensor-parallel must be a number of ranks from 1 to 256");
  }
  ro.tensor_parallel = static_cast<int>(tensor_parallel);

  GenerationRequest req;
  ASSIGN_OR_RETURN(int64_t max_new, args.GetInt("max-new-tokens"));
  if (max_new <= 0 || max_new > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--max-new-tokens must be a positive number of tokens");
  }
  req.max_new_tokens = static_cast<int32_t>(max_new);
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature"));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k"));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p"));
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed"));
  req.sampling = {static_cast<float>(temperature), static_cast<int32_t>(top_k), static_cast<float>(top_p),
                  static_cast<uint64_t>(seed)};
  RETURN_IF_ERROR(ValidateSamplingParams(req.sampling));
  req.stop_strings = args.GetAll("stop");
  for (const std::string& s : args.GetAll("stop-token-id")) {
    int32_t id;
    if (!absl::SimpleAtoi(s, &id)) return absl::InvalidArgumentError("--stop-token-id expects integers");
    req.stop_token_ids.push_back(id);
  }
  req.ignore_eos = args.GetBool("ignore-eos");

  ASSIGN_OR_RETURN(std::optional<SparseRuntimeOptions> sparse, SparseOptionsFromArgs(args, ro.gpu_memory_limit));
  // One request: the planner's step bound is sized for one sequence per step (a generator started with
  // --max-batch 1 plans the same).
  if (sparse) sparse->step.max_batch = 1;

  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  // Like HF, a checkpoint whose generation_config.json samples sets the defaults; flags override them.
  if (const GenerationDefaults& gd = rt.checkpoint.generation; gd.do_sample) {
    if (!args.Has("temperature")) req.sampling.temperature = static_cast<float>(gd.temperature);
    if (!args.Has("top-k")) req.sampling.top_k = static_cast<int32_t>(gd.top_k);
    if (!args.Has("top-p")) req.sampling.top_p = static_cast<float>(gd.top_p);
    absl::Status st = ValidateSamplingParams(req.sampling);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("generation_config.json: ", st.message()));
  }
  SparseRuntime srt;
  EngineOptions eo;
  eo.max_batch = 1;
  // Long prompts take a while to prefill: show how far it got (stderr, every chunk).
  eo.prefill_progress = [](uint64_t, int32_t done, int32_t total) {
    if (total < 4096) return;
    std::fprintf(stderr, "prefill: %d / %d tokens%s", done, total, done == total ? "\n" : "\r");
    std::fflush(stderr);
  };
  if (sparse) {
    ASSIGN_OR_RETURN(srt, MakeSparseRuntime(rt, *sparse));
    eo.sparse = srt.decoder;
  }
  std::string prompt = args.GetString("prompt");
  const std::string template_name = args.GetString("chat-template");
  if (template_name != "none") {
    ASSIGN_OR_RETURN(const ChatTemplate tmpl, ResolveChatTemplate(template_name, rt));
    std::vector<ChatMessage> messages;
    if (args.Has("system")) messages.push_back({"system", args.GetString("system")});
    messages.push_back({"user", prompt});
    ASSIGN_OR_RETURN(req.prompt, EncodeChatPrompt(rt, tmpl, messages));
  } else {
    ASSIGN_OR_RETURN(req.prompt, EncodePrompt(rt, prompt));
  }

  const StreamCallback stream = [](const StreamEvent& ev) {
    if (!ev.text.empty()) {
      std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
      std::fflush(stdout);
    }
  };
  Engine engine(rt.model.get(), rt.tokenizer.get(), eo);
  const absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(GenerationResult result, ro.tensor_parallel > 1
                                                ? GenerateTensorParallel(rt, engine, eo, srt.tp_decoders, std::move(req), stream)
                                                : engine.Generate(std::move(req), stream));
  const double total_s = absl::ToDoubleSeconds(absl::Now() - start);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  const double decode_s = result.stats.decode_ms / 1e3;
  const int gen = result.stats.generated_tokens;
  std::fprintf(stderr,
               "%s",
               absl::StrFormat("[summary] prompt_tokens=%d generated_tokens=%d tokens_per_s=%.2f "
                               "ttft_ms=%.1f total_s=%.2f finish=%s backend=%s tensor_parallel=%d\n",
                               result.stats.prompt_tokens, gen,
                               gen > 1 && decode_s > 0 ? (gen - 1) / decode_s : (total_s > 0 ? gen / total_s : 0),
                               result.stats.time_to_first_token_ms, total_s,
                               std::string(FinishReasonName(result.reason)), rt.backend->name(),
                               ro.tensor_parallel)
                   .c_str());
  if (sparse) {
    const SparseEngineStats st = engine.sparse_stats();
    std::fprintf(stderr, "%s",
                 absl::StrFormat("[sparse] budget=%d source=%s sparse_steps=%d dense_steps=%d overlap=%.3f "
                                 "rows_loaded=%d bytes_loaded=%d bytes_full_reload=%d offloaded_layers=%d "
                                 "captured_mass=%.3f weak_retrieval_fallback_steps=%d "
                                 "weak_retrieval_fallback_sequences=%d\n",
                                 sparse->budget, sparse->selection_source, st.sparse_steps, st.dense_steps,
                                 st.elastic.overlap_ratio(), st.elastic.rows_loaded, st.elastic.bytes_loaded,
                                 st.elastic.bytes_full_reload, st.offloaded_layers, st.last_captured_mass,
                                 st.weak_retrieval_fallback_steps, st.weak_retrieval_fallback_sequences)
                     .c_str());
  }
  return absl::OkStatus();
}

}  // namespace

int GenerateMain(int argc, char** argv) {
  Args args;
  DefineGenerateFlags(args);
  return RunCommand("specontext generate", args, argc, argv, 2, RunGenerate);
}

}  // namespace specontext
