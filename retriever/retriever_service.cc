#include "retriever/retriever_service.h"

#include <memory>

#include "absl/time/clock.h"
#include "core/status_macros.h"

namespace specontext::retriever {

absl::StatusOr<RetrieverMetrics> RegisterRetrieverMetrics(metrics::Registry* r) {
  RetrieverMetrics m;
  ASSIGN_OR_RETURN(m.messages, r->AddCounter("spc_retriever_messages_total", "Session messages by kind.", {"kind"}));
  ASSIGN_OR_RETURN(m.errors, r->AddCounter("spc_retriever_errors_total",
                                           "Per-sequence errors returned on Session streams, by code.", {"code"}));
  ASSIGN_OR_RETURN(auto* lat, r->AddHistogram("spc_retrieval_latency_seconds",
                                              "Time to answer a Select with index sets.", {},
                                              metrics::LatencyBucketsSeconds()));
  ASSIGN_OR_RETURN(m.select_latency, lat->WithLabels({}));
  ASSIGN_OR_RETURN(auto* sessions, r->AddGauge("spc_retriever_sessions", "Open Session streams."));
  ASSIGN_OR_RETURN(m.sessions, sessions->WithLabels({}));
  ASSIGN_OR_RETURN(auto* seqs, r->AddGauge("spc_retriever_sequences", "Open sequences over all sessions."));
  ASSIGN_OR_RETURN(m.sequences, seqs->WithLabels({}));
  ASSIGN_OR_RETURN(auto* bytes, r->AddGauge("spc_retriever_cache_bytes",
                                            "Host bytes of the retrieval K caches and queries."));
  ASSIGN_OR_RETURN(m.cache_bytes, bytes->WithLabels({}));
  return m;
}

void ToProto(const SelectionResult& sel, uint64_t step, v1::Selection* out) {
  out->set_step(step);
  v1::IndexSets* s = out->mutable_sets();
  s->set_n_seqs(sel.sets.n_seqs);
  s->set_n_kv_heads(sel.sets.n_kv_heads);
  s->set_sets_per_seq(sel.sets.sets_per_seq);
  s->set_budget(sel.sets.budget);
  s->mutable_seq_len()->Add(sel.sets.seq_len.begin(), sel.sets.seq_len.end());
  s->mutable_indptr()->Add(sel.sets.indptr.begin(), sel.sets.indptr.end());
  s->mutable_indices()->Add(sel.sets.indices.begin(), sel.sets.indices.end());
  out->mutable_attention_mass()->Add(sel.captured_mass.begin(), sel.captured_mass.end());
}

void RetrieverService::Refresh() {
  metrics_->sessions->Set(static_cast<double>(totals_.sessions.load()));
  metrics_->sequences->Set(static_cast<double>(totals_.sequences.load()));
  metrics_->cache_bytes->Set(static_cast<double>(totals_.cache_bytes.load()));
}

grpc::Status RetrieverService::Session(grpc::ServerContext* context,
                                       grpc::ServerReaderWriter<v1::RetrieverResponse, v1::RetrieverRequest>* stream) {
  auto owned = std::make_unique<RetrieverSession>(head_, limits_, &totals_);
  RetrieverSession& session = *owned;
  Refresh();
  v1::RetrieverRequest req;
  auto count = [&](const char* kind) {
    if (auto c = metrics_->messages->WithLabels({kind}); c.ok()) (*c)->Increment();
  };
  while (!context->IsCancelled() && stream->Read(&req)) {
    absl::Status st;
    uint64_t seq = 0;
    v1::RetrieverResponse resp;
    bool reply = false;
    const int n_set = req.has_open() + req.has_observe() + req.has_select() + req.has_close();
    if (n_set != 1) {
      st = absl::InvalidArgumentError("a RetrieverRequest must set exactly one of open, observe, select, close");
      count("invalid");
    } else if (req.has_open()) {
      count("open");
      seq = req.open().sequence_id();
      st = session.Open(seq, req.open().max_tokens());
    } else if (req.has_observe()) {
      count("observe");
      seq = req.observe().sequence_id();
      st = session.Observe(seq, {req.observe().token_ids().begin(), req.observe().token_ids().end()},
                           {req.observe().hidden().begin(), req.observe().hidden().end()});
    } else if (req.has_select()) {
      count("select");
      const absl::Time t0 = absl::Now();
      absl::StatusOr<SelectionResult> sel =
          session.Select({req.select().sequence_ids().begin(), req.select().sequence_ids().end()},
                         req.select().budget(), req.select().has_sink() ? req.select().sink() : 1);
      if (sel.ok()) {
        ToProto(*sel, req.select().step(), resp.mutable_selection());
        reply = true;
        metrics_->select_latency->Observe(absl::ToDoubleSeconds(absl::Now() - t0));
      } else {
        st = sel.status();
        // A Select always gets an answer, so the caller never waits for one that will not come.
        resp.mutable_selection()->set_step(req.select().step());
      }
    } else {
      count("close");
      seq = req.close().sequence_id();
      st = session.Close(seq);
    }
    if (!st.ok()) {
      v1::RetrieverError* e = resp.mutable_error();
      e->set_sequence_id(seq);
      e->set_message(std::string(st.message()));
      e->set_code(static_cast<int>(st.code()));
      if (auto c = metrics_->errors->WithLabels({absl::StatusCodeToString(st.code())}); c.ok()) (*c)->Increment();
      reply = true;
    }
    Refresh();
    if (reply && !stream->Write(resp)) break;
  }
  // Every exit path (end of stream, broken stream, cancellation) frees the session's sequences here.
  owned.reset();
  Refresh();
  return grpc::Status::OK;
}

grpc::Status RetrieverService::GetInfo(grpc::ServerContext*, const v1::RetrieverInfoRequest*, v1::RetrieverInfo* info) {
  info->set_head_path(head_path_);
  info->set_n_kv_heads(static_cast<int32_t>(head_->n_kv_heads()));
  info->set_max_sequences(limits_.max_sequences);
  info->set_max_tokens_per_sequence(limits_.max_tokens_per_sequence);
  return grpc::Status::OK;
}

}  // namespace specontext::retriever
