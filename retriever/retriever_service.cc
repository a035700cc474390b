#include "retriever/retriever_service.h"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/dtype.h"
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

absl::StatusOr<std::vector<float>> FeaturesFromProto(const v1::Observe& o) {
  if (o.features().empty()) return std::vector<float>(o.hidden().begin(), o.hidden().end());
  if (o.hidden_size() > 0) return absl::InvalidArgumentError("observe: set hidden or features, not both");
  const std::string& b = o.features();
  std::vector<float> out;
  if (o.features_dtype() == v1::FEATURE_DTYPE_BF16) {
    if (b.size() % 2 != 0) return absl::InvalidArgumentError("observe: bf16 features need an even byte count");
    out.resize(b.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      const uint16_t lo = static_cast<uint8_t>(b[2 * i]), hi = static_cast<uint8_t>(b[2 * i + 1]);
      const uint16_t v = static_cast<uint16_t>(lo | (hi << 8));
      out[i] = Bf16ToF32(v);
    }
  } else if (o.features_dtype() == v1::FEATURE_DTYPE_F32) {
    if (b.size() % 4 != 0) return absl::InvalidArgumentError("observe: f32 features need a multiple of 4 bytes");
    out.resize(b.size() / 4);
    std::memcpy(out.data(), b.data(), b.size());  // little-endian hosts only (x86-64, aarch64)
  } else {
    return absl::InvalidArgumentError(absl::StrCat("observe: unknown features_dtype ", o.features_dtype()));
  }
  return out;
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

absl::Status ObserveBatch(RetrieverSession& session, const v1::ObserveBatch& batch, uint64_t* failed) {
  const int n = batch.observes_size();
  std::vector<std::vector<int32_t>> ids(n);
  std::vector<std::vector<float>> fused(n);
  std::vector<RetrieverSession::ObserveEntry> entries(n);
  for (int i = 0; i < n; ++i) {
    const v1::Observe& o = batch.observes(i);
    absl::StatusOr<std::vector<float>> f = FeaturesFromProto(o);
    if (!f.ok()) {
      *failed = o.sequence_id();
      return f.status();
    }
    fused[i] = *std::move(f);
    ids[i].assign(o.token_ids().begin(), o.token_ids().end());
    entries[i] = {o.sequence_id(), ids[i], fused[i]};
  }
  return session.ObserveBatch(entries, failed);
}

void RetrieverService::Refresh() {
  metrics_->sessions->Set(static_cast<double>(totals_.sessions.load()));
  metrics_->sequences->Set(static_cast<double>(totals_.sequences.load()));
  metrics_->cache_bytes->Set(static_cast<double>(totals_.cache_bytes.load()));
}

grpc::Status RetrieverService::Session(grpc::ServerContext* context,
                                       grpc::ServerReaderWriter<v1::RetrieverResponse, v1::RetrieverRequest>* stream) {
  // Each session holds a handler thread and up to max_sequences caches: their number is bounded per
  // process, so one client opening streams cannot take every thread or the memory others need.
  if (max_sessions_ > 0 && session_slots_.fetch_add(1) >= max_sessions_) {
    --session_slots_;
    if (auto c = metrics_->errors->WithLabels({"RESOURCE_EXHAUSTED"}); c.ok()) (*c)->Increment();
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("the retriever already serves ", max_sessions_,
                                     " sessions (--max-sessions); retry later"));
  }
  struct SlotRelease {
    RetrieverService* self;
    ~SlotRelease() {
      if (self->max_sessions_ > 0) --self->session_slots_;
    }
  } slot_release{this};
  auto owned = std::make_unique<RetrieverSession>(head_, limits_, &totals_, runner_);
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
    const int n_set =
        req.has_open() + req.has_observe() + req.has_select() + req.has_close() + req.has_observe_batch();
    if (n_set != 1) {
      st = absl::InvalidArgumentError(
          "a RetrieverRequest must set exactly one of open, observe, select, close, observe_batch");
      count("invalid");
    } else if (req.has_open()) {
      count("open");
      seq = req.open().sequence_id();
      st = session.Open(seq, req.open().max_tokens());
    } else if (req.has_observe()) {
      count("observe");
      seq = req.observe().sequence_id();
      absl::StatusOr<std::vector<float>> fused = FeaturesFromProto(req.observe());
      st = fused.ok() ? session.Observe(seq, {req.observe().token_ids().begin(), req.observe().token_ids().end()},
                                        *fused)
                      : fused.status();
    } else if (req.has_observe_batch()) {
      count("observe_batch");
      st = ObserveBatch(session, req.observe_batch(), &seq);
    } else if (req.has_select()) {
      count("select");
      const absl::Time t0 = absl::Now();
      absl::StatusOr<SelectionResult> sel =
          session.Select({req.select().sequence_ids().begin(), req.select().sequence_ids().end()},
                         req.select().budget(), req.select().has_sink() ? req.select().sink() : 1,
                         req.select().batch_level() ? SelectionMode::kBatchLevel : SelectionMode::kHeadLevel);
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
  info->set_head_name(head_name_);
  info->set_n_kv_heads(static_cast<int32_t>(head_->n_kv_heads()));
  info->set_max_sequences(limits_.max_sequences);
  info->set_max_tokens_per_sequence(limits_.max_tokens_per_sequence);
  for (int64_t l : head_->config().fusion_layers) info->add_fusion_layers(static_cast<int32_t>(l));
  info->set_fused_width(static_cast<int32_t>(head_->fused_width()));
  info->set_max_tokens_per_observe(limits_.max_tokens_per_observe);
  return grpc::Status::OK;
}

}  // namespace specontext::retriever
