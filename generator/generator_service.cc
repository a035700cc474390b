#include "generator/generator_service.h"

#include <algorithm>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/log.h"
#include "core/status_grpc.h"
#include "generator/event_channel.h"

namespace specontext::generator {
namespace {

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStopToken: return v1::FINISH_REASON_STOP;
    case FinishReason::kStopString: return v1::FINISH_REASON_STOP_STRING;
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    default: return v1::FINISH_REASON_UNSPECIFIED;
  }
}

// How often a handler waiting for events checks its call for cancellation and deadline.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);
// How long a cancelled call waits for the engine to confirm before returning anyway.
constexpr absl::Duration kCancelConfirmWait = absl::Seconds(1);

}  // namespace

namespace {

// The gRPC side of a call.
class GrpcSink final : public CallSink {
 public:
  GrpcSink(grpc::ServerContext* context, grpc::ServerWriter<v1::GenerateResponse>* writer)
      : context_(context), writer_(writer) {}
  bool Cancelled() override { return context_->IsCancelled(); }
  bool DeadlinePassed() override { return context_->deadline() <= std::chrono::system_clock::now(); }
  bool Write(const v1::GenerateResponse& response) override { return writer_->Write(response); }

 private:
  grpc::ServerContext* context_;
  grpc::ServerWriter<v1::GenerateResponse>* writer_;
};

}  // namespace

GenerationCall::~GenerationCall() {
  if (loop_ == nullptr) return;
  if (!finished_) loop_->Cancel(id_);  // never streamed (the client left before): free its KV
  if (kvstore_ != nullptr) kvstore_->End(id_);
}

void GeneratorService::BeginCall() {
  ++active_calls_;
  metrics_->active_calls->Increment();
}

void GeneratorService::EndCall(const absl::Status& status, absl::Time arrival, const std::string& peer) {
  metrics_->active_calls->Decrement();
  --active_calls_;
  metrics_->CountRequest(StatusCodeName(static_cast<int>(status.code())));
  metrics_->request_latency->Observe(absl::ToDoubleSeconds(absl::Now() - arrival));
  if (!status.ok() && status.code() != absl::StatusCode::kCancelled &&
      status.code() != absl::StatusCode::kDeadlineExceeded) {
    SPC_LOG(INFO) << "Generate rejected" << Kv("peer", peer)
                  << Kv("code", StatusCodeName(static_cast<int>(status.code())))
                  << Kv("message", status.message());
  }
}

grpc::Status GeneratorService::Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                                        grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const absl::Time arrival = absl::Now();
  BeginCall();
  GrpcSink sink(context, writer);
  absl::Status status;
  {
    absl::StatusOr<std::unique_ptr<GenerationCall>> call =
        Admit(*request, ClientKeyOf(*context), [context] { return context->IsCancelled(); }, arrival);
    status = call.ok() ? Stream(**call, sink) : call.status();
  }
  EndCall(status, arrival, context->peer());
  return ToGrpcStatus(status);
}

absl::StatusOr<std::unique_ptr<GenerationCall>> GeneratorService::Admit(const v1::GenerateRequest& request,
                                                                         const std::string& client,
                                                                         const std::function<bool()>& cancelled,
                                                                         absl::Time arrival) {
  if (draining_) return absl::UnavailableError("the server is draining (shutting down)");
  std::unique_ptr<GenerationCall> call(new GenerationCall());
  call->arrival_ = arrival;
  // Held until the call ends: a client's calls count from before their prompt is prepared.
  absl::StatusOr<PeerLimiter::Slot> slot = peers_.Acquire(client);
  if (!slot.ok()) return slot.status();
  call->slot_.emplace(*std::move(slot));
  absl::StatusOr<PreparedRequest> prepared = PrepareRequest(request, *runtime_, options_.limits);
  if (!prepared.ok()) return prepared.status();
  prepared->engine.client = client;  // admission is round-robin by client
  // Preparation of a large prompt takes up to about a second: a client that left meanwhile gets no slot.
  if (cancelled && cancelled()) return absl::CancelledError("the client cancelled the call");
  if (draining_) return absl::UnavailableError("the server is draining (shutting down)");
  call->request_id_ = prepared->request_id.empty() ? absl::StrCat("req-", next_request_id_.fetch_add(1))
                                                   : prepared->request_id;
  call->prompt_tokens_ = static_cast<int32_t>(prepared->engine.prompt.size());
  call->sparse_ = prepared->sparse && options_.sparse_engine;
  call->budget_ = prepared->budget;

  // Shared with the engine's callback, which may outlive the call only until the final event.
  call->channel_ = std::make_shared<EventChannel>(options_.channel_capacity);
  // The engine's SpeContext counters are read on the engine thread when the request finishes; the
  // channel's lock orders that write before the handler reads it after popping the final event.
  call->final_stats_ = std::make_shared<GenerationCall::FinalStats>();
  EngineLoop* loop = loop_;
  call->fallback_at_submit_ = loop_->RetrievalStatsNow().fallback_steps;  // thread-safe source
  absl::StatusOr<uint64_t> id =
      loop_->Submit(std::move(prepared->engine),
                    [channel = call->channel_, final_stats = call->final_stats_, loop](const StreamEvent& ev) {
                      if (ev.done) {
                        final_stats->engine = loop->SparseStatsNow();
                        final_stats->path = loop->RetrievalStatsNow();
                      }
                      channel->Push(ev);
                    });
  if (!id.ok()) return id.status();
  call->loop_ = loop_;
  call->id_ = *id;
  call->kvstore_ = options_.kvstore;
  if (call->kvstore_ != nullptr) call->kvstore_->Begin(*id, static_cast<uint64_t>(call->prompt_tokens_));
  return call;
}

absl::Status GeneratorService::Stream(GenerationCall& call, CallSink& sink) {
  const absl::Time arrival = call.arrival_;
  const int32_t prompt_tokens = call.prompt_tokens_;
  EventChannel* channel = call.channel_.get();
  KvStoreTracker* kv = call.kvstore_;
  int64_t generated = 0;

  bool cancel_sent = false;
  bool write_failed = false;
  absl::Time cancel_at = absl::InfiniteFuture();
  absl::Time first_token = absl::InfinitePast();
  EventBatch batch;
  bool id_sent = false;
  while (true) {
    if (!cancel_sent && (write_failed || sink.Cancelled())) {
      loop_->Cancel(call.id_);  // frees the sequence's KV at the engine's next step
      cancel_sent = true;
      cancel_at = absl::Now();
    }
    if (!channel->Pop(kPollInterval, &batch)) {
      // A request still queued behind a full batch is only finished when the engine reaches it; the
      // callback owns the channel, so the handler need not hold a thread until then.
      if (cancel_sent && absl::Now() - cancel_at > kCancelConfirmWait) break;
      continue;
    }
    if (!batch.tokens.empty() && first_token == absl::InfinitePast()) {
      first_token = batch.first_token_at;
      metrics_->ttft->Observe(absl::ToDoubleSeconds(first_token - arrival));
    }
    metrics_->tokens_generated->Increment(static_cast<double>(batch.tokens.size()));
    generated += static_cast<int64_t>(batch.tokens.size());
    if (kv != nullptr && !batch.tokens.empty()) {
      kv->SetTokens(call.id_, static_cast<uint64_t>(prompt_tokens + generated));
    }
    if (cancel_sent) {
      if (batch.done) break;
      continue;  // wait for the engine to confirm; nothing more goes to the client
    }
    v1::GenerateResponse response;
    if (!id_sent) {
      response.set_request_id(call.request_id_);
      id_sent = true;
    }
    response.mutable_token_ids()->Add(batch.tokens.begin(), batch.tokens.end());
    response.set_text(batch.text);
    if (batch.done) {
      if (batch.reason == FinishReason::kError) break;  // reported as the call's status below
      response.set_done(true);
      response.set_finish_reason(ToProto(batch.reason));
      v1::Usage* usage = response.mutable_usage();
      const GenerationStats& s = batch.stats;
      usage->set_prompt_tokens(prompt_tokens);
      usage->set_generated_tokens(s.generated_tokens);
      usage->set_time_to_first_token_ms(first_token == absl::InfinitePast()
                                            ? s.time_to_first_token_ms
                                            : absl::ToDoubleMilliseconds(first_token - arrival));
      usage->set_queue_ms(std::max(0.0, usage->time_to_first_token_ms() - s.time_to_first_token_ms));
      usage->set_tokens_per_second(s.generated_tokens > 1 && s.decode_ms > 0
                                       ? (s.generated_tokens - 1) * 1e3 / s.decode_ms
                                       : 0.0);
      if (s.generated_tokens > 1 && s.decode_ms > 0) {
        metrics_->tpot->Observe(s.decode_ms / 1e3 / (s.generated_tokens - 1));
      }
      v1::SparsityStats* sp = response.mutable_sparsity();
      const bool sparse = call.sparse_;
      sp->set_sparse(sparse);
      sp->set_budget(sparse ? call.budget_ : 0);
      if (options_.sparse_engine) FillSparsityStats(call.final_stats_->engine, call.final_stats_->path, sp);
      // Decode steps of this request (the first token comes from the prompt's forward).
      const int64_t decode_steps = sparse ? std::max(0, s.generated_tokens - 1) : 0;
      const int64_t fallback = std::min<int64_t>(decode_steps, call.final_stats_->path.fallback_steps -
                                                                    call.fallback_at_submit_);
      sp->set_fallback_steps(std::max<int64_t>(0, fallback));
      sp->set_retrieval_steps(decode_steps - sp->fallback_steps());
    }
    if (!sink.Write(response)) write_failed = true;
    if (batch.done) break;
  }
  call.finished_ = true;  // confirmed, or given up on after kCancelConfirmWait (Cancel was sent)
  metrics_->prompt_tokens->Increment(prompt_tokens);
  metrics_->merged_events->Increment(static_cast<double>(channel->merged()));
  if (batch.reason == FinishReason::kError) return batch.status;
  if (cancel_sent) {
    metrics_->cancelled->Increment();
    if (sink.DeadlinePassed()) {
      return absl::DeadlineExceededError("the deadline passed before generation finished");
    }
    return absl::CancelledError("the call was cancelled");
  }
  return absl::OkStatus();
}

grpc::Status GeneratorService::GetModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*,
                                            v1::ModelInfo* info) {
  const ModelConfig& c = runtime_->model->config();
  info->set_model_name(options_.model_name);
  info->set_architecture(c.model_type);
  info->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  info->set_max_context(options_.max_context > 0 ? options_.max_context
                                                : static_cast<int32_t>(c.max_position_embeddings));
  info->set_n_layers(static_cast<int32_t>(c.num_hidden_layers));
  // Under tensor parallelism `c` is rank 0's shard: report the whole model's heads.
  const int64_t ranks = std::max<int64_t>(1, static_cast<int64_t>(runtime_->tp_comms.size()));
  info->set_n_heads(static_cast<int32_t>(c.num_attention_heads * ranks));
  info->set_n_kv_heads(static_cast<int32_t>(c.num_key_value_heads * ranks));
  info->set_head_dim(static_cast<int32_t>(c.head_dim));
  info->set_backend(std::string(runtime_->backend->name()));
  info->set_has_tokenizer(runtime_->tokenizer != nullptr);
  for (int64_t id : c.eos_token_ids) info->add_eos_token_ids(static_cast<int32_t>(id));
  info->set_default_budget(options_.limits.default_budget);
  info->set_retriever(options_.retriever);
  info->set_max_batch(options_.max_batch);
  info->set_max_queue(options_.max_queue);
  return grpc::Status::OK;
}

}  // namespace specontext::generator
