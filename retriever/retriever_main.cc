// specontext-retriever: serves a retrieval head over specontext.v1.Retriever (plus grpc.health.v1
// and reflection), Prometheus /metrics on its own port; SIGTERM stops it (open streams are cancelled).
#include <cstdio>
#include <memory>
#include <string>

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "core/cli/args.h"
#include "core/io/file_util.h"
#include "core/io/weight_source.h"
#include "core/log.h"
#include "core/metrics/metrics_server.h"
#include "core/runtime/runtime.h"
#include "core/status_macros.h"
#include "generator/server_common.h"
#include "retriever/retriever_service.h"

namespace specontext::retriever {
namespace {

void DefineFlags(Args& a) {
  a.Define({"head", "retrieval head directory (config.json + model.safetensors)", false, false, ""});
  a.Define({"model", "target model: needed when the head shares the target's embedding", false, false, ""});
  a.Define({"backend", "where the head runs and selects: cpu (the f32 host reference), cuda (the GPU: for split "
            "mode at GPU rates) or auto (cuda when built and a GPU is present, else the CPU backend)", false, false,
            "cpu"});
  a.Define({"gpu-memory-limit", "cap on device memory, e.g. 4GiB (0 = all); with --backend cuda or auto", false, false,
            "0"});
  a.Define({"listen", "gRPC address HOST:PORT (port 0 picks a free one)", false, false, "127.0.0.1:50052"});
  a.Define({"metrics-port", "port of the Prometheus /metrics server (0 picks a free one)", false, false, "9465"});
  a.Define({"metrics-host", "address the /metrics and /healthz server binds (all interfaces by default)", false,
            false, "0.0.0.0"});
  a.Define({"metrics-tls-cert", "PEM certificate chain: serve /metrics and /healthz over HTTPS", false, false, ""});
  a.Define({"metrics-tls-key", "PEM private key for --metrics-tls-cert", false, false, ""});
  a.Define({"max-sequences", "open sequences per session", false, false, "256"});
  a.Define({"max-tokens-per-sequence", "retrieval K cache rows per sequence", false, false, "131072"});
  a.Define({"max-message-bytes", "largest gRPC message accepted or sent (a Select whose reply could be larger is "
            "refused)", false, false, "64MiB"});
  a.Define({"max-sessions", "Session streams open at once over all clients (RESOURCE_EXHAUSTED beyond)", false,
            false, "64"});
  a.Define({"max-cache-bytes", "retrieval cache bytes of all sessions together (an Open or Observe past it: "
            "RESOURCE_EXHAUSTED); 0 = no bound", false, false, "4GiB"});
  a.Define({"tls-cert", "PEM certificate chain: serve TLS", false, false, ""});
  a.Define({"tls-key", "PEM private key for --tls-cert", false, false, ""});
  a.Define({"tls-client-ca", "PEM CA: require client certificates signed by it (mutual TLS)", false, false, ""});
  a.Define({"port-file", "write \"GRPC_PORT METRICS_PORT\" here once serving", false, false, ""});
  a.Define({"log-level", "debug, info, warning or error", false, false, "info"});
}

// The target's config: from the model when given, else from the dimensions the head recorded.
absl::StatusOr<std::unique_ptr<RetrievalHead>> LoadHead(const std::string& head_dir, const std::string& model,
                                                        Checkpoint* checkpoint) {
  if (!model.empty()) {
    ASSIGN_OR_RETURN(*checkpoint, OpenCheckpoint(model));
    return RetrievalHead::Load(head_dir, checkpoint->config, checkpoint->weights.get());
  }
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(head_dir + "/config.json", 1 << 20));
  ASSIGN_OR_RETURN(RetrievalHeadConfig hc, ParseRetrievalHeadConfig(text));
  if (!hc.own_embedding) {
    return absl::InvalidArgumentError("this head shares the target's embedding: pass --model");
  }
  ModelConfig target;
  target.vocab_size = hc.target.vocab_size;
  target.hidden_size = hc.target.hidden_size;
  target.num_hidden_layers = hc.target.num_hidden_layers;
  target.num_key_value_heads = hc.target.num_key_value_heads;
  target.head_dim = hc.target.head_dim;
  return RetrievalHead::Load(head_dir, target, nullptr);
}

absl::Status Run(const Args& args) {
  RETURN_IF_ERROR(RemoveStalePortFile(args.GetString("port-file")));
  if (args.GetString("head").empty()) return absl::InvalidArgumentError("--head is required");
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  SessionLimits limits;
  ASSIGN_OR_RETURN(int64_t max_seqs, args.GetInt("max-sequences"));
  ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens-per-sequence"));
  if (max_seqs < 1 || max_seqs > (1 << 20) || max_tokens < 1 || max_tokens > (1 << 24)) {
    return absl::InvalidArgumentError("--max-sequences and --max-tokens-per-sequence are out of range");
  }
  limits.max_sequences = static_cast<int32_t>(max_seqs);
  limits.max_tokens_per_sequence = static_cast<int32_t>(max_tokens);
  ASSIGN_OR_RETURN(int64_t max_message, MessageBytesFlag(args, "max-message-bytes"));
  limits.max_reply_bytes = max_message;
  ASSIGN_OR_RETURN(int64_t max_sessions, args.GetInt("max-sessions"));
  if (max_sessions < 1 || max_sessions > (1 << 16)) {
    return absl::InvalidArgumentError("--max-sessions must be between 1 and 65536");
  }
  ASSIGN_OR_RETURN(limits.max_total_cache_bytes, args.GetBytes("max-cache-bytes"));
  if (limits.max_total_cache_bytes < 0) return absl::InvalidArgumentError("--max-cache-bytes must be >= 0");
  ASSIGN_OR_RETURN(int64_t metrics_port, args.GetInt("metrics-port"));
  TlsOptions tls{args.GetString("tls-cert"), args.GetString("tls-key"), args.GetString("tls-client-ca")};
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds, MakeServerCredentials(tls));

  const std::string backend_name = args.GetString("backend");
  if (backend_name != "cpu" && backend_name != "cuda" && backend_name != "auto") {
    return absl::InvalidArgumentError(absl::StrCat("--backend must be cpu, cuda or auto, got \"", backend_name, "\""));
  }
  ASSIGN_OR_RETURN(int64_t gpu_memory_limit, args.GetBytes("gpu-memory-limit"));
  if (gpu_memory_limit < 0) return absl::InvalidArgumentError("--gpu-memory-limit must be >= 0");

  Checkpoint checkpoint;
  ASSIGN_OR_RETURN(std::unique_ptr<RetrievalHead> head,
                   LoadHead(args.GetString("head"), args.GetString("model"), &checkpoint));
  // cpu keeps the f32 host reference (RetrievalHead + SelectTopB, the numbers the tests compare against)
  // rather than the CPU Backend: the two agree only to rounding, and the sidecar's figures stay as they were.
  std::unique_ptr<HeadRunner> runner;
  if (backend_name != "cpu") {
    ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend(backend_name, gpu_memory_limit));
    ASSIGN_OR_RETURN(runner, HeadRunner::Create(*head, std::move(backend)));
  }
  metrics::Registry registry;
  ASSIGN_OR_RETURN(RetrieverMetrics rm, RegisterRetrieverMetrics(&registry));
  RetrieverService service(head.get(), ArtifactNameFromPath(args.GetString("head")), limits, &rm,
                           static_cast<int32_t>(max_sessions), runner.get());

  EnableStandardServices();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  RefusePortSharing(&builder);
  builder.AddListeningPort(args.GetString("listen"), creds, &grpc_port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_message));
  builder.SetMaxSendMessageSize(static_cast<int>(max_message));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", args.GetString("listen"),
                                               " (is the port in use or the address not local?)"));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  metrics::MetricsServerOptions metrics_options;
  metrics_options.tls_cert_file = args.GetString("metrics-tls-cert");
  metrics_options.tls_key_file = args.GetString("metrics-tls-key");
  metrics::MetricsServer metrics_server(&registry, args.GetString("metrics-host"), static_cast<int>(metrics_port),
                                        metrics_options);
  if (absl::Status st = metrics_server.Start(); !st.ok()) {
    server->Shutdown();
    return st;
  }
  // Whoever waits for the port file would wait forever: not having written it is a failed start.
  if (absl::Status st =
          WritePortFile(args.GetString("port-file"), grpc_port, metrics_server.port());
      !st.ok()) {
    server->Shutdown();
    metrics_server.Stop();
    return st;
  }
  SPC_LOG(INFO) << "specontext-retriever serving" << Kv("grpc_port", grpc_port)
                << Kv("metrics_port", metrics_server.port()) << Kv("head", args.GetString("head"))
                << Kv("backend", runner != nullptr ? runner->backend_name() : "cpu (host reference)")
                << Kv("parameters", head->parameter_count());
  const int sig = WaitForTerminationSignal();
  SPC_LOG(INFO) << "stopping" << Kv("signal", sig);
  server->GetHealthCheckService()->SetServingStatus(false);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  metrics_server.Stop();
  return absl::OkStatus();
}

}  // namespace
}  // namespace specontext::retriever

int main(int argc, char** argv) {
  specontext::BlockTerminationSignals();
  specontext::Args args;
  specontext::retriever::DefineFlags(args);
  return specontext::RunCommand("specontext-retriever", args, argc, argv, 1, specontext::retriever::Run);
}
