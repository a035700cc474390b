// `specontext score`: teacher-forced scoring of a token sequence through the Engine's decode path (every
// token after the first --prompt-tokens is a decode step, so sparse selection runs at each one). Prints a
// JSON line with the mean negative log-likelihood and perplexity (overall and per position bucket) and can
// write every step's logits to a .npy file for comparison with a reference (tools/reference/). In sparse mode
// --recall (or --recall-out FILE.jsonl, one line per decode step, with the loss of the token its logits
// predict) probes the attention recall of every layer and query head in the decode forward
// (SparseOptions::recall_observer) and adds its summary.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/io/file_util.h"
#include "core/model/engine.h"
#include "core/runtime/runtime.h"
#include "core/runtime/sparse_runtime.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/specontext/commands.h"
#include "tools/specontext/npy_writer.h"
#include "tools/specontext/recall_summary.h"
#include "tools/specontext/sparse_flags.h"

namespace specontext {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxInputBytes = 256u << 20;

void DefineScoreFlags(Args& args) {
  args.Define({"model", "HF model directory, GGUF file or llama2.c .bin checkpoint"});
  args.Define({"tokenizer", "tokenizer.json or llama2.c tokenizer .bin (default: the model's)"});
  args.Define({"token-ids", "JSON file: an array of token ids, or an object with \"tokens\""});
  args.Define({"text", "text file to tokenize with the model's tokenizer (with its default BOS)"});
  args.Define({"max-tokens", "score at most this many tokens of the input (0 = all)", false, false, "0"});
  args.Define({"prompt-tokens", "leading tokens prefilled as the prompt; every later token is a decode step",
               false, false, "1"});
  args.Define({"buckets", "position bucket edges for the per-bucket figures, e.g. 1024,4096"});
  args.Define({"logits-out", ".npy file for the logits of every scored step [steps, vocab] (f32)"});
  args.Define({"recall", "sparse: probe the attention recall of every layer and head (summary in the JSON line)", true});
  args.Define({"recall-out", "sparse: JSONL file, one line per decode step: position, per-layer mean and min recall "
               "(implies --recall)"});
  args.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  args.Define({"gpu-memory-limit", "cap on device memory, e.g. 4GiB (0 = all)", false, false, "0"});
  args.Define({"threads", "CPU threads (0 = the CPUs this process may use)", false, false, "0"});
  args.Define({"log-level", "debug, info, warning or error", false, false, "warning"});
  DefineSparseFlags(args);
  DefineCudaGraphsFlag(args);
  DefineBatchInvariantFlag(args);
}

absl::StatusOr<std::vector<int32_t>> ReadTokenIds(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxInputBytes));
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  const json* list = &j;
  if (j.is_object() && j.contains("tokens")) list = &j["tokens"];
  if (!list->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON array of token ids or {\"tokens\": [...]}"));
  }
  std::vector<int32_t> ids;
  for (const json& v : *list) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ids must be non-negative integers, got ", v.dump()));
    }
    ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
  }
  return ids;
}

// Accumulates the negative log-likelihood of the forced tokens, per position bucket.
struct NllBuckets {
  std::vector<int64_t> edges;  // ascending; bucket b holds positions in [edges[b-1], edges[b])
  std::vector<double> sum;
  std::vector<int64_t> count, top1;
  explicit NllBuckets(std::vector<int64_t> e) : edges(std::move(e)), sum(edges.size() + 1), count(sum.size()), top1(sum.size()) {}
  void Add(int64_t position, double nll, bool argmax_hit) {
    const size_t b = std::upper_bound(edges.begin(), edges.end(), position) - edges.begin();
    sum[b] += nll;
    ++count[b];
    top1[b] += argmax_hit;
  }
  json ToJson() const {
    json out = json::array();
    for (size_t b = 0; b < sum.size(); ++b) {
      if (count[b] == 0) continue;
      const double mean = sum[b] / count[b];
      out.push_back({{"from", b == 0 ? 0 : edges[b - 1]},
                     {"to", b < edges.size() ? json(edges[b]) : json(nullptr)},
                     {"tokens", count[b]},
                     {"nll_mean", mean},
                     {"perplexity", std::exp(mean)},
                     {"argmax_is_next", static_cast<double>(top1[b]) / count[b]}});
    }
    return out;
  }
};

absl::Status RunScore(const Args& args) {
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  if (args.Has("token-ids") == args.Has("text")) {
    return absl::InvalidArgumentError("give exactly one of --token-ids FILE and --text FILE");
  }
  ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens"));
  ASSIGN_OR_RETURN(int64_t prompt_tokens, args.GetInt("prompt-tokens"));
  std::vector<int64_t> edges;
  if (args.Has("buckets")) {
    ASSIGN_OR_RETURN(edges, args.GetPositiveIntList("buckets"));
  }
  std::sort(edges.begin(), edges.end());
  ASSIGN_OR_RETURN(std::optional<SparseRuntimeOptions> sparse, SparseOptionsFromArgs(args, ro.gpu_memory_limit));
  const bool recall = args.GetBool("recall") || args.Has("recall-out");
  if (recall && !sparse) return absl::InvalidArgumentError("--recall and --recall-out need --sparse");
  std::FILE* recall_file = nullptr;
  if (args.Has("recall-out")) {
    recall_file = std::fopen(args.GetString("recall-out").c_str(), "w");
    if (recall_file == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("--recall-out: cannot write ", args.GetString("recall-out")));
    }
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> recall_closer(recall_file, [](std::FILE* f) {
    return f != nullptr ? std::fclose(f) : 0;
  });
  RecallSummary recall_summary(edges);
  // A step's line waits for the logits of that step (they come right after its forward) to carry "nll",
  // the loss of the token those logits predict: one sequence, so at most one line is pending.
  std::optional<nlohmann::ordered_json> pending_line;
  auto flush_line = [&pending_line, recall_file]() {
    if (pending_line && recall_file != nullptr) std::fprintf(recall_file, "%s\n", pending_line->dump().c_str());
    pending_line.reset();
  };
  if (recall) {
    sparse->recall_observer = [&](const AttentionRecallStep& step) {
      for (int32_t i = 0; i < step.n_seqs; ++i) {
        recall_summary.Add(step, i);
        flush_line();
        pending_line = RecallStepLine(step, i);
      }
    };
  }

  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  std::vector<int32_t> tokens;
  if (args.Has("token-ids")) {
    ASSIGN_OR_RETURN(tokens, ReadTokenIds(args.GetString("token-ids")));
  } else {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(args.GetString("text"), kMaxInputBytes));
    ASSIGN_OR_RETURN(tokens, EncodePrompt(rt, text));
  }
  if (max_tokens < 0) return absl::InvalidArgumentError("--max-tokens must be >= 0");
  if (max_tokens > 0 && static_cast<int64_t>(tokens.size()) > max_tokens) tokens.resize(max_tokens);
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (prompt_tokens < 1 || prompt_tokens >= n) {
    return absl::InvalidArgumentError(absl::StrCat("--prompt-tokens must be in [1, ", n - 1, "] for ", n,
                                                   " tokens (at least one token must be scored)"));
  }
  const int64_t vocab = rt.model->config().vocab_size;

  EngineOptions eo;
  SparseRuntime srt;
  if (sparse) {
    ASSIGN_OR_RETURN(srt, MakeSparseRuntime(rt, *sparse));
    eo.sparse = srt.decoder;
  }
  std::optional<NpyRowWriter> npy;
  if (args.Has("logits-out")) {
    ASSIGN_OR_RETURN(NpyRowWriter w, NpyRowWriter::Create(args.GetString("logits-out"), n - prompt_tokens, vocab));
    npy.emplace(std::move(w));
  }
  GenerationRequest req;
  req.prompt.assign(tokens.begin(), tokens.begin() + prompt_tokens);
  req.forced_tokens.assign(tokens.begin() + prompt_tokens, tokens.end());
  req.max_new_tokens = static_cast<int32_t>(n - prompt_tokens);
  NllBuckets buckets(edges);
  absl::Status write_status;
  const bool tty = isatty(fileno(stderr));
  req.logits_observer = [&](int32_t index, std::span<const float> logits) {
    const int64_t position = prompt_tokens + index;  // of the token these logits predict
    const int32_t target = tokens[position];
    const float max = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
    const double nll = std::log(sum) + max - logits[target];
    const bool hit = std::max_element(logits.begin(), logits.end()) - logits.begin() == target;
    buckets.Add(position, nll, hit);
    if (pending_line && (*pending_line)["position"].get<int64_t>() == position - 1) {
      (*pending_line)["nll"] = std::round(nll * 1e4) / 1e4;
      flush_line();
    }
    if (npy && write_status.ok()) write_status = npy->Append(logits);
    if ((index + 1) % 256 == 0 || index + 1 == req.max_new_tokens) {
      std::fprintf(stderr, "score: %d / %d tokens%s", index + 1, static_cast<int>(n - prompt_tokens),
                   tty && index + 1 < n - prompt_tokens ? "\r" : "\n");
    }
  };
  const int32_t steps = req.max_new_tokens;
  Engine engine(rt.model.get(), rt.tokenizer.get(), eo);
  const absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(GenerationResult result, engine.Generate(std::move(req)));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  RETURN_IF_ERROR(write_status);
  flush_line();
  if (npy) RETURN_IF_ERROR(npy->Close());
  if (result.stats.generated_tokens != steps) {
    return absl::InternalError(absl::StrCat("scored ", result.stats.generated_tokens, " of ", steps, " tokens"));
  }
  NllBuckets all({});
  for (size_t b = 0; b < buckets.sum.size(); ++b) {
    all.sum[0] += buckets.sum[b];
    all.count[0] += buckets.count[b];
    all.top1[0] += buckets.top1[b];
  }
  json out = {{"model", ro.model_path},
              {"backend", rt.backend->name()},
              {"tokens", n},
              {"prompt_tokens", prompt_tokens},
              {"scored", steps},
              {"nll_mean", all.sum[0] / all.count[0]},
              {"perplexity", std::exp(all.sum[0] / all.count[0])},
              {"argmax_is_next", static_cast<double>(all.top1[0]) / all.count[0]},
              {"buckets", buckets.ToJson()},
              {"seconds", seconds},
              {"sparse", sparse.has_value()}};
  if (sparse) {
    const SparseEngineStats st = engine.sparse_stats();
    out["budget"] = sparse->budget;
    out["sink"] = sparse->sink;
    out["selection_source"] = sparse->selection_source;
    out["sparse_steps"] = st.sparse_steps;
    out["dense_steps"] = st.dense_steps;
    out["fallback_mass"] = sparse->fallback_mass;
    out["weak_retrieval_fallback_steps"] = st.weak_retrieval_fallback_steps;
    out["weak_retrieval_fallback_sequences"] = st.weak_retrieval_fallback_sequences;
    if (recall) out["recall"] = recall_summary.ToJson();
  }
  if (recall_file != nullptr && std::fclose(recall_closer.release()) != 0) {
    return absl::InternalError("--recall-out: writing the file failed");
  }
  std::printf("%s\n", out.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

int ScoreMain(int argc, char** argv) {
  Args args;
  DefineScoreFlags(args);
  return RunCommand("specontext score", args, argc, argv, 2, RunScore);
}

}  // namespace specontext
