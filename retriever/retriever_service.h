// specontext.v1.Retriever over RetrieverSession: one session per Session stream, freed when the
// stream ends, fails or is cancelled. Per-sequence errors come back as RetrieverError messages and the
// stream stays open; only a broken stream ends it.
#pragma once

#include <atomic>
#include <string>

#include "core/metrics/metrics.h"
#include "proto/specontext.grpc.pb.h"
#include "retriever/retriever_session.h"

namespace specontext::retriever {

struct RetrieverMetrics {
  metrics::CounterFamily* messages = nullptr;  // spc_retriever_messages_total{kind}
  metrics::CounterFamily* errors = nullptr;    // spc_retriever_errors_total{code}
  metrics::Histogram* select_latency = nullptr;
  metrics::Gauge* sessions = nullptr;
  metrics::Gauge* sequences = nullptr;
  metrics::Gauge* cache_bytes = nullptr;
};
absl::StatusOr<RetrieverMetrics> RegisterRetrieverMetrics(metrics::Registry* registry);

class RetrieverService final : public v1::Retriever::Service {
 public:
  /// Everything passed in must outlive the service. `max_sessions`: Session streams open at once over
  /// all clients (one more gets RESOURCE_EXHAUSTED); 0 = no bound. `runner`: the head on a Backend shared by
  /// every session (`--backend cuda|auto`), or null for the f32 host reference (`--backend cpu`).
  RetrieverService(const RetrievalHead* head, std::string head_name, SessionLimits limits, RetrieverMetrics* metrics,
                   int32_t max_sessions = 0, HeadRunner* runner = nullptr)
      : head_(head), head_name_(std::move(head_name)), limits_(limits), metrics_(metrics),
        max_sessions_(max_sessions), runner_(runner) {}

  grpc::Status Session(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<v1::RetrieverResponse, v1::RetrieverRequest>* stream) override;
  grpc::Status GetInfo(grpc::ServerContext* context, const v1::RetrieverInfoRequest* request,
                       v1::RetrieverInfo* info) override;

  const RetrieverTotals& totals() const { return totals_; }

 private:
  void Refresh();

  const RetrievalHead* head_;
  std::string head_name_;
  SessionLimits limits_;
  RetrieverMetrics* metrics_;
  int32_t max_sessions_;
  HeadRunner* runner_;
  std::atomic<int32_t> session_slots_{0};  // Session calls holding a slot under max_sessions_
  RetrieverTotals totals_;
};

/// Packs a selection into the wire format (same CSR arrays).
void ToProto(const SelectionResult& selection, uint64_t step, v1::Selection* out);
/// An Observe's fused features as f32 rows (from `hidden`, or `features` in f32 or bf16); InvalidArgument
/// for both set, a byte count that is not whole values, or an unknown dtype.
absl::StatusOr<std::vector<float>> FeaturesFromProto(const v1::Observe& observe);

/// Runs an ObserveBatch message on `session` (RetrieverSession::ObserveBatch: all or nothing); on error
/// `*failed` is the refused entry's sequence id (its features, when malformed, refuse the batch too).
absl::Status ObserveBatch(RetrieverSession& session, const v1::ObserveBatch& batch, uint64_t* failed);

}  // namespace specontext::retriever
