// specontext.v1.Generator over an EngineLoop: validates each request, submits it to the engine and
// streams its events back. A thin layer: all failures come from libraries as absl::Status and are
// mapped once (core/status_grpc.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "core/runtime/runtime.h"
#include "generator/engine_loop.h"
#include "generator/event_channel.h"
#include "generator/generator_metrics.h"
#include "generator/kvstore_tracker.h"
#include "generator/peer_limits.h"
#include "generator/request_builder.h"
#include "proto/specontext.grpc.pb.h"

namespace specontext::generator {

struct ServiceOptions {
  RequestLimits limits;
  size_t channel_capacity = 64;  // pending response messages per call before events are merged
  std::string model_name;        // what GetModelInfo reports (ArtifactNameFromPath), never the path
  std::string retriever = "none";
  bool sparse_engine = false;
  KvStoreTracker* kvstore = nullptr;  // --kvstore: per-request table entries (may be null)  // the engine runs with SparseDecodeHooks (--retriever inproc|HOST:PORT + head)
  int32_t max_batch = 0;
  int32_t max_queue = 0;
  int32_t max_context = 0;  // --max-context (else the model's): what GetModelInfo reports
  int32_t max_requests_per_peer = 0;  // --max-requests-per-peer: calls in flight per client (0 = no bound)
};

/// The transport side of one Generate call (a gRPC stream, an HTTP response): the service asks it
/// whether the client is still there and hands it each response message.
class CallSink {
 public:
  virtual ~CallSink() = default;
  /// True once the client left or its deadline passed: the request is cancelled at the next step.
  virtual bool Cancelled() = 0;
  /// True when the call's deadline has passed (a cancelled call then ends with DEADLINE_EXCEEDED).
  virtual bool DeadlinePassed() { return false; }
  /// Sends one response (the last one has done = true); false when the client cannot be written to.
  virtual bool Write(const v1::GenerateResponse& response) = 0;
};

/// One admitted request: its per-client slot, its engine id and the channel its events come on.
/// Destroying a call that was not streamed to the end cancels the engine request.
class GenerationCall {
 public:
  ~GenerationCall();
  GenerationCall(const GenerationCall&) = delete;
  GenerationCall& operator=(const GenerationCall&) = delete;

  const std::string& request_id() const { return request_id_; }
  int32_t prompt_tokens() const { return prompt_tokens_; }

 private:
  friend class GeneratorService;
  struct FinalStats {
    SparseEngineStats engine;
    RetrievalPathStats path;
  };
  GenerationCall() = default;

  EngineLoop* loop_ = nullptr;
  KvStoreTracker* kvstore_ = nullptr;
  std::optional<PeerLimiter::Slot> slot_;
  absl::Time arrival_;
  std::string request_id_;
  int32_t prompt_tokens_ = 0;
  bool sparse_ = false;
  int64_t budget_ = 0;
  uint64_t id_ = 0;
  int64_t fallback_at_submit_ = 0;
  std::shared_ptr<EventChannel> channel_;
  std::shared_ptr<FinalStats> final_stats_;
  bool finished_ = false;  // the engine confirmed the end (or Stream() gave up waiting for it)
};

class GeneratorService final : public v1::Generator::Service {
 public:
  /// `runtime`, `loop` and `metrics` must outlive the service.
  GeneratorService(const Runtime* runtime, EngineLoop* loop, GeneratorMetrics* metrics, ServiceOptions options)
      : runtime_(runtime), loop_(loop), metrics_(metrics), options_(std::move(options)),
        peers_(options_.max_requests_per_peer) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::ModelInfoRequest* request,
                            v1::ModelInfo* response) override;

  /// The transport-neutral core of Generate, for every front end (gRPC here, HTTP in
  /// generator/openai_http_server.h). A call goes BeginCall -> Admit -> Stream -> EndCall; Admit and
  /// Stream return library statuses, mapped to the transport's codes by its one mapping function.
  /// `arrival` is when the call arrived; BeginCall counts it active until EndCall.
  void BeginCall();
  void EndCall(const absl::Status& status, absl::Time arrival, const std::string& peer);
  /// Checks draining and the client's slot, validates and tokenizes the request and submits it
  /// (RESOURCE_EXHAUSTED when the queue is full). `cancelled` is asked once the prompt is prepared.
  absl::StatusOr<std::unique_ptr<GenerationCall>> Admit(const v1::GenerateRequest& request,
                                                        const std::string& client,
                                                        const std::function<bool()>& cancelled,
                                                        absl::Time arrival);
  /// Forwards the call's events to `sink` until the request finishes, the client leaves or
  /// `sink.Write` fails. CANCELLED / DEADLINE_EXCEEDED when the client left, the engine's error else.
  absl::Status Stream(GenerationCall& call, CallSink& sink);
  const ServiceOptions& options() const { return options_; }

  /// New calls get UNAVAILABLE from now on; calls in flight finish normally.
  void StartDraining() { draining_ = true; }
  bool draining() const { return draining_; }
  int active_calls() const { return active_calls_; }

 private:

  const Runtime* runtime_;
  EngineLoop* loop_;
  GeneratorMetrics* metrics_;
  ServiceOptions options_;
  PeerLimiter peers_;
  std::atomic<bool> draining_{false};
  std::atomic<int> active_calls_{0};
  std::atomic<uint64_t> next_request_id_{1};
};

}  // namespace specontext::generator
