#include "generator/sparse_setup.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "generator/remote_sparse_decoder.h"
#include "generator/server_common.h"

namespace specontext::generator {
namespace {

// The engine's largest step (--max-tokens-per-step, --max-batch; range checked by generator_main): the
// sparse decoder's planner sizes its step bound for it.
absl::StatusOr<SparseStepShape> StepShapeFromArgs(const Args& args) {
  ASSIGN_OR_RETURN(int64_t tokens, args.GetInt("max-tokens-per-step"));
  ASSIGN_OR_RETURN(int64_t batch, args.GetInt("max-batch"));
  SparseStepShape step;
  step.max_tokens_per_step = static_cast<int32_t>(tokens);
  step.max_batch = static_cast<int32_t>(batch);
  return step;
}

}  // namespace

absl::StatusOr<SparseSetup> SetUpSparse(const Args& args, const Runtime& rt, const std::string& retriever,
                                        GeneratorMetrics* metrics) {
  SparseSetup out;
  const std::string head = args.GetString("retrieval-head");
  ASSIGN_OR_RETURN(int64_t budget, args.GetInt("budget"));
  ASSIGN_OR_RETURN(int64_t sink, args.GetInt("sink"));
  const int64_t context = rt.model->config().max_position_embeddings;
  // --budget 0 keeps requests that name no budget dense; the decoder still needs a default >= 1.
  const int64_t decoder_budget = budget > 0 ? budget : std::min<int64_t>(2048, context);
  const bool retriever_tls = !args.GetString("retriever-tls-ca").empty() ||
                             !args.GetString("retriever-tls-cert").empty() ||
                             !args.GetString("retriever-tls-key").empty();
  if (retriever_tls && (retriever == "none" || retriever == "inproc")) {
    return absl::InvalidArgumentError("--retriever-tls-ca/-cert/-key need a remote --retriever HOST:PORT");
  }
  if (retriever == "none") {
    if (!head.empty()) {
      return absl::InvalidArgumentError("--retrieval-head needs --retriever inproc (or use --retriever HOST:PORT)");
    }
    return out;
  }
  const std::string source = args.GetString("selection-source");
  ASSIGN_OR_RETURN(double fallback_mass, args.GetDouble("fallback-mass"));
  if (retriever != "inproc" && (source != "head" || fallback_mass != 0)) {
    return absl::InvalidArgumentError("--selection-source and --fallback-mass need --retriever inproc");
  }
  if (retriever == "inproc") {
    if (head.empty() && source == "head") {
      SPC_LOG(WARNING) << "--retriever inproc without --retrieval-head: decoding stays dense";
      return out;
    }
    SparseRuntimeOptions so;
    so.selection_source = source;
    so.fallback_mass = fallback_mass;
    so.retrieval_head = head;
    so.budget = decoder_budget;
    so.sink = sink;
    so.selection = args.GetString("selection");
    ASSIGN_OR_RETURN(so.gpu_memory_limit, args.GetBytes("gpu-memory-limit"));
    ASSIGN_OR_RETURN(so.max_context, args.GetInt("max-context"));
    ASSIGN_OR_RETURN(so.step, StepShapeFromArgs(args));
    ASSIGN_OR_RETURN(out.inproc, MakeSparseRuntime(rt, so));
    out.hooks = out.inproc.decoder;
    SPC_LOG(INFO) << "sparse decoding in process" << Kv("head", head) << Kv("source", source) << Kv("budget", so.budget)
                  << Kv("sink", so.sink)
                  << Kv("head_parameters", out.inproc.head != nullptr ? out.inproc.head->parameter_count() : 0);
    return out;
  }
  // Split mode: the retriever service holds the head.
  if (!head.empty()) SPC_LOG(WARNING) << "--retrieval-head is ignored with a remote --retriever";
  RemoteSparseOptions ro;
  ro.address = retriever;
  ro.budget = static_cast<int32_t>(decoder_budget);
  ro.sink = static_cast<int32_t>(sink);
  const std::string selection = args.GetString("selection");
  if (selection != "head" && selection != "batch") {
    return absl::InvalidArgumentError(absl::StrCat("--selection must be head or batch, got \"", selection, "\""));
  }
  ro.batch_level = selection == "batch";
  ASSIGN_OR_RETURN(int64_t deadline_ms, args.GetInt("retriever-deadline-ms"));
  if (deadline_ms < 1) return absl::InvalidArgumentError("--retriever-deadline-ms must be >= 1");
  ro.step_deadline = absl::Milliseconds(deadline_ms);
  ASSIGN_OR_RETURN(ro.gpu_memory_limit, args.GetBytes("gpu-memory-limit"));
  ASSIGN_OR_RETURN(int64_t max_context, args.GetInt("max-context"));
  ro.max_context = static_cast<int32_t>(max_context);  // range checked by generator_main and Create
  ASSIGN_OR_RETURN(ro.step, StepShapeFromArgs(args));
  ASSIGN_OR_RETURN(ro.max_message_bytes, MessageBytesFlag(args, "retriever-max-message-bytes"));
  ro.retrieval_latency = metrics != nullptr ? metrics->retrieval_latency : nullptr;
  ClientTlsOptions tls{args.GetString("retriever-tls-ca"), args.GetString("retriever-tls-cert"),
                       args.GetString("retriever-tls-key")};
  ASSIGN_OR_RETURN(ro.credentials, MakeChannelCredentials(tls, "--retriever-tls-"));
  ro.tls_server_name = args.GetString("retriever-tls-server-name");
  ASSIGN_OR_RETURN(std::shared_ptr<RemoteSparseDecoder> dec, RemoteSparseDecoder::Create(rt.model.get(), ro));
  out.path_stats = [dec] { return dec->path_stats(); };
  out.hooks = dec;
  SPC_LOG(INFO) << "sparse decoding with a remote retriever" << Kv("address", retriever) << Kv("budget", ro.budget)
                << Kv("deadline_ms", deadline_ms);
  return out;
}

}  // namespace specontext::generator
