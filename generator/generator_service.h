// specontext.v1.Generator over an EngineLoop: validates each request, submits it to the engine and
// streams its events back. A thin layer: all failures come from libraries as absl::Status and are
// mapped once (core/status_grpc.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "core/runtime/runtime.h"
#include "generator/engine_loop.h"
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

  /// New calls get UNAVAILABLE from now on; calls in flight finish normally.
  void StartDraining() { draining_ = true; }
  bool draining() const { return draining_; }
  int active_calls() const { return active_calls_; }

 private:
  grpc::Status Serve(grpc::ServerContext* context, const v1::GenerateRequest& request,
                     grpc::ServerWriter<v1::GenerateResponse>* writer);

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
