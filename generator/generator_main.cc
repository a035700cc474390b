// specontext-generator: the generation service (specontext.v1.Generator, grpc.health.v1, reflection)
// with Prometheus /metrics on its own port and, with --http-port, an OpenAI-compatible HTTP API. SIGTERM/SIGINT drain: new calls are refused, calls in
// flight finish, then the process exits 0.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/log.h"
#include "core/metrics/metrics_server.h"
#include "core/runtime/runtime.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"
#include "generator/engine_loop.h"
#include "generator/generator_service.h"
#include "generator/kvstore_host_tier.h"
#include "generator/openai_http_server.h"
#include "generator/server_common.h"
#include "generator/sparse_setup.h"

namespace specontext::generator {
namespace {

void DefineFlags(Args& a) {
  a.Define({"model", "HF model directory, GGUF file or llama2.c .bin checkpoint", false, false, ""});
  a.Define({"tokenizer", "tokenizer.json or llama2.c tokenizer .bin (default: beside the model)", false, false, ""});
  a.Define({"listen", "gRPC address HOST:PORT (port 0 picks a free one)", false, false, "127.0.0.1:50051"});
  a.Define({"metrics-port", "port of the Prometheus /metrics server (0 picks a free one)", false, false, "9464"});
  a.Define({"metrics-host", "address the /metrics and /healthz server binds (all interfaces by default)", false,
            false, "0.0.0.0"});
  a.Define({"metrics-tls-cert", "PEM certificate chain: serve /metrics and /healthz over HTTPS", false, false, ""});
  a.Define({"metrics-tls-key", "PEM private key for --metrics-tls-cert", false, false, ""});
  a.Define({"http-port", "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models): off, or a port (0 picks a free one); TLS as --tls-cert/--tls-key/--tls-client-ca", false,
            false, "off"});
  a.Define({"http-host", "address the OpenAI-compatible HTTP API binds (all interfaces by default)", false, false,
            "0.0.0.0"});
  a.Define({"retriever", "none, inproc or HOST:PORT of a specontext-retriever", false, false, "none"});
  a.Define({"retrieval-head", "retrieval head directory (specontext prune): turns on sparse decoding", false, false,
            ""});
  a.Define({"budget", "default sparse budget (past tokens per KV head per step); 0 = dense unless a request sets one",
            false, false, "0"});
  a.Define({"sink", "first tokens always attended in sparse mode", false, false, "1"});
  a.Define({"selection", "head (one set per KV head) or batch (one set per sequence)", false, false, "head"});
  a.Define({"selection-source", "inproc: where index sets come from: head (the retrieval head), or for evaluation "
            "window (sink + most recent), oracle or quest (each layer's own; no head needed)", false, false, "head"});
  a.Define({"fallback-mass", "inproc, head source: a sequence whose head kept less than this attention mass "
            "attends densely in the resident layers for that step; the other sequences keep their sets and "
            "offloaded layers their selected rows (0 = off)", false, false, "0"});
  a.Define({"retriever-deadline-ms", "split mode: longest wait for a step's index sets before falling back",
            false, false, "200"});
  a.Define({"retriever-max-message-bytes", "split mode: largest reply taken from the retriever (a Selection holds "
            "sequences x budget x KV heads x 4 bytes; a larger one makes the step fall back): at least the "
            "retriever's own --max-message-bytes", false, false, "64MiB"});

  a.Define({"retriever-tls-ca", "split mode: PEM CA the retriever's certificate must chain to (TLS to the "
            "retriever)", false, false, ""});
  a.Define({"retriever-tls-cert", "split mode: PEM client certificate for a retriever requiring mutual TLS", false,
            false, ""});
  a.Define({"retriever-tls-key", "PEM private key for --retriever-tls-cert", false, false, ""});
  a.Define({"retriever-tls-server-name", "name checked against the retriever's certificate (default: its host)",
            false, false, ""});
  a.Define({"kvstore", "name of the shared-memory KV store segment (created or attached)", false, false, ""});
  a.Define({"kvstore-blocks", "blocks of the segment when this process creates it", false, false, "4096"});
  a.Define({"kvstore-block-bytes", "bytes per block when this process creates it", false, false, "64KiB"});
  a.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  a.Define({"gpu-memory-limit", "cap on device memory, e.g. 4GiB (0 = all)", false, false, "0"});
  DefineCudaGraphsFlag(a);
  DefineBatchInvariantFlag(a);
  a.Define({"tensor-parallel", "ranks of tensor parallelism, one thread, model shard and engine each, stepped in "
            "lockstep (dense or in-process sparse; CUDA: see --tensor-parallel-devices); must divide the model's KV "
            "heads", false, false, "1"});
  DefineTensorParallelDevicesFlag(a);
  a.Define({"threads", "CPU threads of the backend (0 = the CPUs this process may use)", false,
            false, "0"});
  a.Define({"max-context", "longest sequence (prompt + generated tokens) a request may reach; 0 = the model's "
            "context (the sparse planner keeps that much more KV on the GPU when it is lower)", false, false, "0"});
  a.Define({"max-batch", "sequences decoding at once", false, false, "32"});
  a.Define({"max-tokens-per-step", "prompt tokens per engine step", false, false, "512"});
  a.Define({"max-queue", "requests waiting for admission before RESOURCE_EXHAUSTED", false, false, "256"});
  a.Define({"max-requests-per-peer", "calls one client (address without port, or mTLS identity) may have queued "
            "or running; RESOURCE_EXHAUSTED beyond (0 = no bound)", false, false, "64"});
  a.Define({"max-running-per-peer", "batch slots one client may hold at once, so the rest stay open to other "
            "clients (0 = no bound: a lone client may fill the batch)", false, false, "0"});
  a.Define({"max-streams-per-connection", "concurrent calls on one HTTP/2 connection (more wait in the client)",
            false, false, "100"});
  a.Define({"max-kv-bytes", "dense mode: KV cache bytes the running requests may reserve together (a request "
            "needing more alone: RESOURCE_EXHAUSTED; otherwise it waits); auto = 90% of the memory free after "
            "loading, 0 = no bound", false, false, "auto"});
  a.Define({"max-message-bytes", "largest gRPC message accepted from or sent to clients", false, false, "4MiB"});
  a.Define({"max-prompt-bytes", "largest prompt text", false, false, "1MiB"});
  a.Define({"max-request-id-bytes", "longest request_id a client may set (INVALID_ARGUMENT beyond)",
            false, false, "256"});
  a.Define({"chat-template", "template for chat messages: none, auto (the model's own), llama3, chatml, qwen3, "
            "deepseek-r1", false, false, "none"});
  a.Define({"tls-cert", "PEM certificate chain: serve TLS", false, false, ""});
  a.Define({"tls-key", "PEM private key for --tls-cert", false, false, ""});
  a.Define({"tls-client-ca", "PEM CA: require client certificates signed by it (mutual TLS)", false, false, ""});
  a.Define({"drain-timeout-s", "longest wait for calls in flight after SIGTERM", false, false, "300"});
  a.Define({"port-file", "write \"GRPC_PORT METRICS_PORT\" (and HTTP_PORT with --http-port) here once serving",
            false, false, ""});
  a.Define({"log-level", "debug, info, warning or error", false, false, "info"});
}

absl::Status Run(const Args& args) {
  RETURN_IF_ERROR(RemoveStalePortFile(args.GetString("port-file")));
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  ASSIGN_OR_RETURN(int64_t tensor_parallel, args.GetInt("tensor-parallel"));
  if (tensor_parallel < 1 || tensor_parallel > 256) {
    return absl::InvalidArgumentError("--tensor-parallel must be a number of ranks from 1 to 256");
  }
  ro.tensor_parallel = static_cast<int>(tensor_parallel);

  ServiceOptions so;
  so.model_name = ArtifactNameFromPath(ro.model_path);
  ASSIGN_OR_RETURN(so.limits.default_budget, args.GetInt("budget"));
  if (so.limits.default_budget < 0) return absl::InvalidArgumentError("--budget must be >= 0");
  ASSIGN_OR_RETURN(so.limits.max_prompt_bytes, args.GetBytes("max-prompt-bytes"));
  ASSIGN_OR_RETURN(so.limits.max_request_id_bytes, args.GetBytes("max-request-id-bytes"));
  if (so.limits.max_request_id_bytes < 1 || so.limits.max_request_id_bytes > (1 << 20)) {
    return absl::InvalidArgumentError("--max-request-id-bytes must be between 1 and 1MiB");
  }
  const std::string chat_template = args.GetString("chat-template");
  if (chat_template != "auto") {  // checked before the model loads; "auto" needs the model
    ASSIGN_OR_RETURN(so.limits.chat_template, ParseChatTemplate(chat_template));
  }
  EngineOptions eo;
  ASSIGN_OR_RETURN(int64_t max_batch, args.GetInt("max-batch"));
  ASSIGN_OR_RETURN(int64_t max_queue, args.GetInt("max-queue"));
  ASSIGN_OR_RETURN(int64_t max_step_tokens, args.GetInt("max-tokens-per-step"));
  if (max_batch < 1 || max_queue < 1 || max_step_tokens < 1) {
    return absl::InvalidArgumentError("--max-batch, --max-queue and --max-tokens-per-step must be >= 1");
  }
  eo.max_batch = static_cast<int32_t>(max_batch);
  eo.max_queue = static_cast<int32_t>(max_queue);
  eo.max_tokens_per_step = static_cast<int32_t>(max_step_tokens);
  so.max_batch = eo.max_batch;
  so.max_queue = eo.max_queue;
  ASSIGN_OR_RETURN(int64_t per_peer, args.GetInt("max-requests-per-peer"));
  ASSIGN_OR_RETURN(int64_t streams_per_connection, args.GetInt("max-streams-per-connection"));
  if (per_peer < 0 || per_peer > (1 << 20) || streams_per_connection < 1 || streams_per_connection > (1 << 20)) {
    return absl::InvalidArgumentError(
        "--max-requests-per-peer must be in [0, 2^20] and --max-streams-per-connection in [1, 2^20]");
  }
  so.max_requests_per_peer = static_cast<int32_t>(per_peer);
  ASSIGN_OR_RETURN(int64_t running_per_peer, args.GetInt("max-running-per-peer"));
  if (running_per_peer < 0 || running_per_peer > max_batch) {
    return absl::InvalidArgumentError("--max-running-per-peer must be in [0, --max-batch]");
  }
  eo.max_running_per_client = static_cast<int32_t>(running_per_peer);
  const std::string max_kv = args.GetString("max-kv-bytes");
  int64_t max_kv_bytes = -1;  // -1: auto, once the model is loaded
  if (max_kv != "auto") {
    ASSIGN_OR_RETURN(max_kv_bytes, args.GetBytes("max-kv-bytes"));
    if (max_kv_bytes < 0) return absl::InvalidArgumentError("--max-kv-bytes must be auto or >= 0");
  }
  ASSIGN_OR_RETURN(int64_t max_message, MessageBytesFlag(args, "max-message-bytes"));
  ASSIGN_OR_RETURN(int64_t drain_timeout_s, args.GetInt("drain-timeout-s"));
  ASSIGN_OR_RETURN(int64_t metrics_port, args.GetInt("metrics-port"));
  int64_t http_port = -1;  // off
  if (args.GetString("http-port") != "off") {
    ASSIGN_OR_RETURN(http_port, args.GetInt("http-port"));
    if (http_port < 0 || http_port > 65535) return absl::InvalidArgumentError("--http-port must be off or 0..65535");
  }

  // Where index sets come from (generator/sparse_setup.h reads the rest of the sparse flags).
  so.retriever = args.GetString("retriever");
  if (so.retriever != "none" && so.retriever != "inproc" &&
      std::vector<std::string>(absl::StrSplit(so.retriever, ':')).size() < 2) {
    return absl::InvalidArgumentError("--retriever must be none, inproc or HOST:PORT");
  }
  if (ro.tensor_parallel > 1 && so.retriever != "none" && so.retriever != "inproc") {
    // Each rank would need its own retriever session over its KV heads.
    return absl::InvalidArgumentError("--tensor-parallel needs --retriever none or inproc (split mode is not "
                                      "supported with tensor parallelism yet)");
  }

  TlsOptions tls{args.GetString("tls-cert"), args.GetString("tls-key"), args.GetString("tls-client-ca")};
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds, MakeServerCredentials(tls));

  absl::StatusOr<Runtime> loaded = LoadRuntime(ro);
  if (!loaded.ok() && ro.tensor_parallel > 1 && absl::StrContains(loaded.status().message(), "tensor parallelism")) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("--tensor-parallel ", ro.tensor_parallel, ": ", loaded.status().message()));
  }
  ASSIGN_OR_RETURN(Runtime rt, std::move(loaded));
  if (chat_template == "auto") {
    absl::StatusOr<ChatTemplate> resolved = ResolveChatTemplate(chat_template, rt);
    if (!resolved.ok()) {
      return absl::Status(resolved.status().code(), absl::StrCat("--chat-template auto: ", resolved.status().message()));
    }
    so.limits.chat_template = *std::move(resolved);
  }
  ASSIGN_OR_RETURN(int64_t max_context, args.GetInt("max-context"));
  const int64_t model_context = rt.model->config().max_position_embeddings;
  if (absl::Status st = ValidateMaxContext(max_context, 0, model_context); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--max-context: ", st.message()));
  }
  eo.max_context = static_cast<int32_t>(max_context);
  so.max_context = static_cast<int32_t>(ContextLimit(max_context, model_context));
  metrics::Registry registry;
  ASSIGN_OR_RETURN(GeneratorMetrics gm, RegisterGeneratorMetrics(&registry));
  // Sparse decoding: the head is loaded now so one that does not fit the model fails at startup.
  ASSIGN_OR_RETURN(SparseSetup sparse, SetUpSparse(args, rt, so.retriever, &gm));
  so.sparse_engine = sparse.hooks != nullptr;
  eo.sparse = sparse.hooks;
  std::unique_ptr<KvStoreTracker> kvstore;
  if (!args.GetString("kvstore").empty()) {
    KvStoreTrackerOptions ko;
    ko.name = args.GetString("kvstore");
    ASSIGN_OR_RETURN(int64_t blocks, args.GetInt("kvstore-blocks"));
    ASSIGN_OR_RETURN(int64_t block_bytes, args.GetBytes("kvstore-block-bytes"));
    if (blocks < 1 || block_bytes < 64 || block_bytes % 64 != 0) {
      return absl::InvalidArgumentError("--kvstore-blocks must be >= 1 and --kvstore-block-bytes a multiple of 64");
    }
    ko.blocks = static_cast<uint64_t>(blocks);
    ko.block_bytes = static_cast<uint64_t>(block_bytes);
    ko.ends_per_request = eo.sparse != nullptr ? 2 : 1;  // sparse: KvStoreHooks::Release ends it too
    ASSIGN_OR_RETURN(kvstore, KvStoreTracker::Create(ko, &registry));
    so.kvstore = kvstore.get();
    // The host KV tier lives in the segment when the backend can address it (CUDA: cudaHostRegister).
    const absl::Status registered = kvstore->RegisterWith(rt.backend.get());
    if (!registered.ok()) {
      SPC_LOG(WARNING) << "kvstore: host KV tiers stay in pinned memory" << Kv("status", registered.ToString());
    }
    // Under tensor parallelism this is rank 0's decoder: its host tier lives in the segment, the other ranks'
    // in their own host memory (where a layer's tier lives changes no scheduling decision).
    if (eo.sparse != nullptr) {
      eo.sparse = std::make_shared<KvStoreHooks>(eo.sparse, kvstore.get(), rt.backend.get(), registered.ok());
    }
  }
  // auto: what is left once the model is loaded, less the transient bytes of the largest step. Under tensor
  // parallelism the budget is in one rank's KV bytes (its shard's heads, equal on every rank) and every rank
  // gets the same one, the smallest of theirs, so they admit the same requests; CPU ranks share the host.
  const int64_t step_workspace = rt.model->ForwardWorkspaceBytes(
      std::max(eo.max_tokens_per_step, eo.max_batch), eo.max_batch);
  const int tp = ro.tensor_parallel;
  eo.max_kv_bytes = max_kv_bytes >= 0 ? max_kv_bytes : DefaultKvBudgetBytes(*rt.backend, step_workspace, tp);
  for (int r = 1; r < tp && max_kv_bytes < 0; ++r) {
    eo.max_kv_bytes = std::min(eo.max_kv_bytes, DefaultKvBudgetBytes(*rt.tp_backends[r - 1], step_workspace, tp));
  }
  if (eo.sparse == nullptr) {
    SPC_LOG(INFO) << "dense KV budget" << Kv("max_kv_bytes", eo.max_kv_bytes)
                  << Kv("tokens", eo.max_kv_bytes / rt.model->KvBytesPerToken()) << Kv("tensor_parallel", tp);
  }
  Engine engine(rt.model.get(), rt.tokenizer.get(), eo);
  // Ranks 1..N-1: the same options over their shard (sparse: their own decoder); stepped with rank 0's.
  std::vector<std::unique_ptr<Engine>> rank_engines;
  std::unique_ptr<TensorParallelRanks> ranks;
  if (tp > 1) {
    std::vector<Engine*> engines;
    std::vector<Communicator*> comms;
    for (const auto& c : rt.tp_comms) comms.push_back(c.get());
    for (int r = 1; r < tp; ++r) {
      EngineOptions rank_eo = eo;
      if (eo.sparse != nullptr) rank_eo.sparse = sparse.inproc.tp_decoders[r - 1];
      rank_engines.push_back(std::make_unique<Engine>(rt.tp_models[r - 1].get(), rt.tokenizer.get(), rank_eo));
      engines.push_back(rank_engines.back().get());
    }
    ranks = std::make_unique<TensorParallelRanks>(std::move(engines), std::move(comms));
  }
  gm.tensor_parallel_ranks->Set(tp);
  EngineLoop loop(&engine, rt.backend.get(), &gm, ranks.get());
  if (sparse.path_stats) loop.SetRetrievalStats(sparse.path_stats);
  GeneratorService service(&rt, &loop, &gm, so);

  EnableStandardServices();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  RefusePortSharing(&builder);
  builder.AddListeningPort(args.GetString("listen"), creds, &grpc_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_message));
  builder.SetMaxSendMessageSize(static_cast<int>(max_message));
  // One connection cannot open hundreds of calls: streams past this wait in the client's transport.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, static_cast<int>(streams_per_connection));
  loop.Start();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    loop.Stop();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", args.GetString("listen"),
                                               " (is the port in use or the address not local?)"));
  }
  server->GetHealthCheckService()->SetServingStatus(true);

  metrics::MetricsServerOptions metrics_options;
  metrics_options.tls_cert_file = args.GetString("metrics-tls-cert");
  metrics_options.tls_key_file = args.GetString("metrics-tls-key");
  metrics::MetricsServer metrics_server(&registry, args.GetString("metrics-host"), static_cast<int>(metrics_port),
                                        metrics_options);
  metrics_server.SetReadiness([&service, &loop] { return !service.draining() && !loop.failed(); });
  if (absl::Status st = metrics_server.Start(); !st.ok()) {
    server->Shutdown();
    loop.Stop();
    return st;
  }
  // The OpenAI-compatible HTTP API: the same service (validation, limits, admission, draining).
  std::unique_ptr<OpenAiHttpServer> http_server;
  if (http_port >= 0) {
    OpenAiHttpOptions ho;
    ho.tls_cert_file = tls.cert_path;
    ho.tls_key_file = tls.key_path;
    ho.tls_client_ca_file = tls.client_ca_path;
    ho.max_body_bytes = max_message;  // the body cap of a gRPC message
    ho.max_connections = eo.max_batch + eo.max_queue + 64;
    http_server = std::make_unique<OpenAiHttpServer>(&service, args.GetString("http-host"),
                                                     static_cast<int>(http_port), ho);
    if (absl::Status st = http_server->Start(); !st.ok()) {
      server->Shutdown();
      loop.Stop();
      metrics_server.Stop();
      return st;
    }
  }
  // Whoever waits for the port file would wait forever: not having written it is a failed start.
  if (absl::Status st = WritePortFile(args.GetString("port-file"), grpc_port, metrics_server.port(),
                                      http_server != nullptr ? http_server->port() : -1);
      !st.ok()) {
    server->Shutdown();
    if (http_server != nullptr) http_server->Stop();
    loop.Stop();
    metrics_server.Stop();
    return st;
  }
  SPC_LOG(INFO) << "specontext-generator serving" << Kv("grpc_port", grpc_port)
                << Kv("metrics_port", metrics_server.port())
                << Kv("http_port", http_server != nullptr ? http_server->port() : -1) << Kv("backend", rt.backend->name())
                << Kv("retriever", so.retriever) << Kv("batch_invariant", rt.backend->batch_invariant())
                << Kv("tensor_parallel", tp);

  // A tensor-parallel group that failed cannot serve again: drain (its requests already ended with INTERNAL)
  // and exit 1, so that a supervisor restarts the process.
  std::atomic<bool> signalled{false};
  std::thread group_watch;
  if (tp > 1) {
    group_watch = std::thread([&loop, &signalled] {
      while (!signalled.load()) {
        if (loop.failed()) {
          kill(getpid(), SIGTERM);
          return;
        }
        absl::SleepFor(absl::Milliseconds(100));
      }
    });
  }
  const int sig = WaitForTerminationSignal();
  signalled = true;
  if (group_watch.joinable()) group_watch.join();
  SPC_LOG(INFO) << "draining" << Kv("signal", sig) << Kv("active_calls", service.active_calls())
                << Kv("tensor_parallel_failed", loop.failed());
  service.StartDraining();
  gm.draining->Set(1);
  server->GetHealthCheckService()->SetServingStatus(false);
  const absl::Time give_up = absl::Now() + absl::Seconds(drain_timeout_s);
  while ((service.active_calls() > 0 || !loop.Idle()) && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  // Calls still open after the drain timeout are cancelled by the shutdown deadline.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (http_server != nullptr) http_server->Stop();
  loop.Stop();
  metrics_server.Stop();
  if (sparse.path_stats) {
    // Where split mode's steps spent their host time (spc_split_step_seconds_total{phase}, per step).
    SPC_LOG(INFO) << "split-mode steps, ms per step: " << SplitStepSummary(sparse.path_stats().step_seconds);
  }
  SPC_LOG(INFO) << "drained; exiting";
  if (loop.failed()) {
    return absl::InternalError("the tensor-parallel ranks failed (see the log above); restart the generator");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace specontext::generator

int main(int argc, char** argv) {
  // A write to a connection the client closed must fail with EPIPE, not end the process: cpp-httplib's
  // TLS connections (the HTTP API, /metrics over HTTPS) write through OpenSSL without MSG_NOSIGNAL.
  std::signal(SIGPIPE, SIG_IGN);
  specontext::BlockTerminationSignals();
  specontext::Args args;
  specontext::generator::DefineFlags(args);
  return specontext::RunCommand("specontext-generator", args, argc, argv, 1, specontext::generator::Run);
}
