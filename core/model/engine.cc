#include "core/model/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/log.h"
#include "core/parallel/parallel_for.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"
#include "core/tokenizer/tokenizer.h"

namespace specontext {

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStopToken: return "stop";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "?";
}

struct Engine::Sequence {
  uint64_t id = 0;
  GenerationRequest req;
  StreamCallback callback;
  std::unique_ptr<SequenceKv> kv;
  std::vector<int32_t> tokens;  // prompt, then generated
  int32_t n_cached = 0;         // tokens whose KV is in `kv`
  int32_t prompt_len = 0;
  int32_t capacity = 0;
  int32_t budget = 0;           // sparse mode: resolved budget
  Sampler sampler{SamplingParams{}};
  std::unique_ptr<StreamDecoder> decoder;
  std::string text;     // decoded text not yet emitted (held back for stop strings)
  absl::Time admitted, first_token;
  GenerationStats stats;
  bool finished = false;
  bool running = false;     // admitted: counted in its client's ClientState::running
  int64_t kv_reserved = 0;  // dense KV bytes counted in reserved_kv_bytes_ while kv is held
};

Engine::Engine(Transformer* model, const Tokenizer* tokenizer, EngineOptions options)
    : model_(model), tokenizer_(tokenizer), options_(options) {
  if (options_.sparse != nullptr) {
    // The sparse decoder's memory plan covers steps up to its shape (SparseOptions::step): keep within it.
    const int32_t tokens = options_.sparse->max_step_tokens(), seqs = options_.sparse->max_step_seqs();
    if (tokens > 0 && options_.max_tokens_per_step > tokens) {
      SPC_LOG(WARNING) << "max_tokens_per_step lowered to the sparse decoder's planned step"
                       << Kv("asked", options_.max_tokens_per_step) << Kv("planned", tokens);
      options_.max_tokens_per_step = tokens;
    }
    if (seqs > 0 && options_.max_batch > seqs) {
      SPC_LOG(WARNING) << "max_batch lowered to the sparse decoder's planned step" << Kv("asked", options_.max_batch)
                       << Kv("planned", seqs);
      options_.max_batch = seqs;
    }
  }
  for (int64_t id : model->config().eos_token_ids) eos_ids_.push_back(static_cast<int32_t>(id));
  if (tokenizer != nullptr) {
    for (int32_t id : tokenizer->eos_ids()) {
      if (std::find(eos_ids_.begin(), eos_ids_.end(), id) == eos_ids_.end()) eos_ids_.push_back(id);
    }
  }
}

Engine::~Engine() = default;

absl::Status Engine::Validate(GenerationRequest& r) const {
  const ModelConfig& c = model_->config();
  if (r.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  for (int32_t id : r.prompt) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  const int64_t context = ContextLimit(options_.max_context, c.max_position_embeddings);
  if (static_cast<int64_t>(r.prompt.size()) >= context) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", r.prompt.size(), " tokens but the ",
                                                   options_.max_context > 0 ? "engine's max context" : "model's context",
                                                   " is ", context,
                                                   " tokens (at least one must remain for generation)"));
  }
  if (r.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be positive, got ", r.max_new_tokens));
  }
  r.max_new_tokens = static_cast<int32_t>(std::min<int64_t>(r.max_new_tokens, context - r.prompt.size()));
  RETURN_IF_ERROR(ValidateSamplingParams(r.sampling));
  for (int32_t id : r.stop_token_ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop token id ", id, " is outside the vocabulary"));
    }
  }
  for (const std::string& s : r.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  for (int32_t id : r.forced_tokens) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("forced token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (!r.forced_tokens.empty()) {
    r.max_new_tokens = std::min<int32_t>(r.max_new_tokens, static_cast<int32_t>(r.forced_tokens.size()));
  }
  if (!r.stop_strings.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer");
  }
  if (r.budget < 0 || r.budget > context) {
    return absl::InvalidArgumentError(absl::StrCat("budget ", r.budget, " must be in [1, ", context,
                                                   "] (the context), or 0 for the engine's default"));
  }
  return absl::OkStatus();
}

int64_t Engine::KvReservation(int32_t capacity) const {
  return options_.sparse != nullptr ? 0 : static_cast<int64_t>(capacity) * model_->KvBytesPerToken();
}

absl::StatusOr<uint64_t> Engine::Submit(GenerationRequest request, StreamCallback callback) {
  RETURN_IF_ERROR(Validate(request));
  if (options_.max_kv_bytes > 0) {
    const int32_t capacity = static_cast<int32_t>(request.prompt.size()) + request.max_new_tokens;
    const int64_t need = KvReservation(capacity);
    if (need > options_.max_kv_bytes) {
      const int64_t per_token = model_->KvBytesPerToken();
      return absl::ResourceExhaustedError(absl::StrCat(
          "the request needs ", need, " bytes of KV cache (", request.prompt.size(), " prompt + ",
          request.max_new_tokens, " new tokens x ", per_token, " bytes) but the server's KV budget is ",
          options_.max_kv_bytes, " bytes (--max-kv-bytes): at most ", options_.max_kv_bytes / per_token,
          " tokens of prompt + max_new_tokens fit"));
    }
  }
  auto s = std::make_unique<Sequence>();
  s->req = std::move(request);
  s->callback = std::move(callback);
  s->tokens = s->req.prompt;
  s->prompt_len = static_cast<int32_t>(s->tokens.size());
  s->capacity = s->prompt_len + s->req.max_new_tokens;
  s->sampler = Sampler(s->req.sampling);
  if (tokenizer_ != nullptr) s->decoder = std::make_unique<StreamDecoder>(*tokenizer_, /*skip_special=*/true);
  s->stats.prompt_tokens = s->prompt_len;
  absl::MutexLock lock(&mu_);
  if (static_cast<int32_t>(queue_.size()) >= options_.max_queue) {
    return absl::ResourceExhaustedError(absl::StrCat("the request queue is full (", options_.max_queue, ")"));
  }
  s->id = next_id_++;
  const uint64_t id = s->id;
  ++clients_[s->req.client].live;
  queue_.push_back(std::move(s));
  return id;
}

void Engine::Cancel(uint64_t id) {
  absl::MutexLock lock(&mu_);
  cancelled_.insert(id);
}

bool Engine::HasWork() const {
  absl::MutexLock lock(&mu_);
  return !queue_.empty() || !running_.empty();
}

int32_t Engine::queued() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(queue_.size());
}

std::deque<std::unique_ptr<Engine::Sequence>>::iterator Engine::NextToAdmit() {
  auto best = queue_.end();
  uint64_t best_rank = 0;
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    auto c = clients_.find((*it)->req.client);
    if (options_.max_running_per_client > 0 && c != clients_.end() &&
        c->second.running >= options_.max_running_per_client) {
      continue;
    }
    const uint64_t rank = c != clients_.end() ? c->second.last_admission : 0;
    if (best == queue_.end() || rank < best_rank) {
      best = it;
      best_rank = rank;
      if (rank == 0) break;  // nobody ranks before a client never admitted
    }
  }
  return best;
}

void Engine::Admit() {
  while (static_cast<int32_t>(running_.size()) < options_.max_batch) {
    std::unique_ptr<Sequence> s;
    {
      absl::MutexLock lock(&mu_);
      auto next = NextToAdmit();
      if (next == queue_.end()) return;
      s = std::move(*next);
      queue_.erase(next);
    }
    // Dense KV beyond the budget: wait (in front) for running requests to free theirs.
    const int64_t reserve = KvReservation(s->capacity);
    if (options_.max_kv_bytes > 0 && !running_.empty() && reserved_kv_bytes_ + reserve > options_.max_kv_bytes) {
      absl::MutexLock lock(&mu_);
      queue_.push_front(std::move(s));
      return;
    }
    absl::StatusOr<std::unique_ptr<SequenceKv>> kv;
    if (options_.sparse != nullptr) {
      // A dense request attends to every past token; otherwise its budget, never more than it can have.
      const int32_t budget = s->req.dense ? s->capacity
                             : s->req.budget > 0 ? s->req.budget : options_.sparse->default_budget();
      s->budget = std::max(1, std::min(budget, s->capacity));
      kv = options_.sparse->AllocateKv(s->id, s->capacity, s->budget);
    } else {
      kv = model_->AllocateKv(s->capacity);
    }
    if (!kv.ok()) {
      if (absl::IsResourceExhausted(kv.status()) && !running_.empty()) {
        absl::MutexLock lock(&mu_);  // wait for running sequences to free memory
        queue_.push_front(std::move(s));
        return;
      }
      Finish(*s, FinishReason::kError, kv.status());
      continue;
    }
    s->kv = *std::move(kv);
    s->kv_reserved = reserve;
    reserved_kv_bytes_ += reserve;
    s->admitted = absl::Now();
    {
      absl::MutexLock lock(&mu_);
      ClientState& c = clients_[s->req.client];
      c.last_admission = ++admissions_;
      ++c.running;
      s->running = true;
    }
    running_.push_back(std::move(s));
  }
}

void Engine::Emit(Sequence& s, int32_t token) {
  s.tokens.push_back(token);
  ++s.stats.generated_tokens;
  const absl::Time now = absl::Now();
  if (s.stats.generated_tokens == 1) {
    s.first_token = now;
    s.stats.time_to_first_token_ms = absl::ToDoubleMilliseconds(now - s.admitted);
  }
  s.stats.decode_ms = absl::ToDoubleMilliseconds(now - s.first_token);
  const bool forced = !s.req.forced_tokens.empty();
  const bool is_eos = !forced && !s.req.ignore_eos &&
                      std::find(eos_ids_.begin(), eos_ids_.end(), token) != eos_ids_.end();
  const bool is_stop = !forced && std::find(s.req.stop_token_ids.begin(), s.req.stop_token_ids.end(), token) !=
                                      s.req.stop_token_ids.end();
  StreamEvent ev;
  ev.token = token;
  if (is_eos || is_stop) {
    if (s.callback) s.callback(ev);
    Finish(s, FinishReason::kStopToken);
    return;
  }
  if (s.decoder != nullptr) {
    s.text += s.decoder->Push(token);
    // Emit what cannot be the start of a stop string; stop at the first complete one.
    size_t stop_at = std::string::npos;
    for (const std::string& stop : s.req.stop_strings) stop_at = std::min(stop_at, s.text.find(stop));
    if (stop_at != std::string::npos) {
      ev.text = s.text.substr(0, stop_at);
      s.text.clear();
      if (s.callback) s.callback(ev);
      Finish(s, FinishReason::kStopString);
      return;
    }
    size_t hold = 0;
    for (const std::string& stop : s.req.stop_strings) {
      for (size_t len = std::min(stop.size() - 1, s.text.size()); len > hold; --len) {
        if (s.text.compare(s.text.size() - len, len, stop, 0, len) == 0) {
          hold = len;
          break;
        }
      }
    }
    ev.text = s.text.substr(0, s.text.size() - hold);
    s.text.erase(0, s.text.size() - hold);
  }
  if (s.callback) s.callback(ev);
  if (s.stats.generated_tokens >= s.req.max_new_tokens ||
      static_cast<int32_t>(s.tokens.size()) >= s.capacity) {
    Finish(s, FinishReason::kLength);
  }
}

void Engine::Finish(Sequence& s, FinishReason reason, absl::Status status) {
  if (s.finished) return;
  s.finished = true;
  StreamEvent ev;
  ev.done = true;
  ev.reason = reason;
  ev.status = std::move(status);
  if (reason != FinishReason::kStopString && s.decoder != nullptr) ev.text = s.text + s.decoder->Flush();
  s.text.clear();
  ev.stats = s.stats;
  if (s.kv != nullptr && options_.sparse != nullptr) options_.sparse->Release(s.id);
  s.kv.reset();
  reserved_kv_bytes_ -= s.kv_reserved;
  s.kv_reserved = 0;
  {
    absl::MutexLock lock(&mu_);
    auto c = clients_.find(s.req.client);
    if (c != clients_.end()) {
      if (s.running) --c->second.running;
      if (--c->second.live <= 0) clients_.erase(c);
    }
    s.running = false;
  }
  if (s.callback) s.callback(ev);
}

void Engine::ApplyCancellations() {
  // Collected under the lock, finished outside it: callbacks may call back into the engine.
  std::vector<std::unique_ptr<Sequence>> dropped;
  std::vector<Sequence*> stopped;
  {
    absl::MutexLock lock(&mu_);
    if (cancelled_.empty()) return;
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (cancelled_.contains((*it)->id)) {
        dropped.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& s : running_) {
      if (cancelled_.contains(s->id)) stopped.push_back(s.get());
    }
    // Every live request was just matched; what is left names finished or unknown requests.
    cancelled_.clear();
  }
  for (auto& s : dropped) Finish(*s, FinishReason::kCancelled);
  for (Sequence* s : stopped) Finish(*s, FinishReason::kCancelled);
}

absl::Status Engine::Step() {
  ApplyCancellations();
  Admit();
  std::erase_if(running_, [](const auto& s) { return s->finished; });
  if (running_.empty()) return absl::OkStatus();

  // Decode tokens first (one each), then prompt chunks within the step's token budget.
  // Batch-invariant mode (Backend::batch_invariant): the backend runs a one-token chunk as a decoding row
  // (CUDA: the split decode attention), not as a prefill row, so a prompt token's bits would follow where the
  // chunks are cut, and the cuts follow the other requests' prompts. No prompt longer than one pending token
  // is then cut into a one-token chunk (with at least 3 tokens per step there is always another cut).
  const bool no_single_chunks = model_->backend()->batch_invariant() && options_.max_tokens_per_step >= 3;
  std::vector<Sequence*> included;
  std::vector<ForwardSeq> fwd;
  std::vector<int32_t> taken;
  for (int pass = 0; pass < 2; ++pass) {
    int32_t budget = options_.max_tokens_per_step;
    for (auto& sp : running_) {
      Sequence& s = *sp;
      const int32_t pending = static_cast<int32_t>(s.tokens.size()) - s.n_cached;
      const bool decoding = s.n_cached >= s.prompt_len;
      if (pending <= 0 || decoding != (pass == 0)) continue;
      int32_t take = pending;
      if (!decoding) {
        if (budget <= 0) continue;
        take = std::min(pending, budget);
        if (no_single_chunks && pending > 1) {
          if (pending - take == 1) --take;  // leave two for the next step
          if (take < 2) continue;           // wait for a step with more budget left
        }
        budget -= take;
      }
      included.push_back(&s);
      taken.push_back(take);
      fwd.push_back({std::span<const int32_t>(s.tokens.data() + s.n_cached, take), s.n_cached, s.kv.get()});
    }
  }
  std::vector<int32_t> sample_rows;  // rows of `included` whose prompt completes this step: they get a token
  for (size_t i = 0; i < included.size(); ++i) {
    if (included[i]->n_cached + taken[i] == static_cast<int32_t>(included[i]->tokens.size())) {
      sample_rows.push_back(static_cast<int32_t>(i));
    }
  }
  std::vector<int32_t> tokens;
  const absl::Status st = ForwardAndSample(fwd, included, sample_rows, &tokens);
  if (!st.ok()) {
    SPC_LOG(ERROR) << "forward failed" << Kv("status", st.ToString()) << Kv("sequences", fwd.size());
    for (Sequence* s : included) Finish(*s, FinishReason::kError, st);
    std::erase_if(running_, [](const auto& s) { return s->finished; });
    return st;
  }
  for (size_t i = 0; i < included.size(); ++i) {
    Sequence& s = *included[i];
    s.n_cached += taken[i];
    if (options_.prefill_progress && s.stats.generated_tokens == 0) {
      options_.prefill_progress(s.id, std::min(s.n_cached, s.prompt_len), s.prompt_len);
    }
  }
  for (size_t j = 0; j < sample_rows.size(); ++j) Emit(*included[sample_rows[j]], tokens[j]);
  std::erase_if(running_, [](const auto& s) { return s->finished; });
  return absl::OkStatus();
}

absl::Status Engine::ForwardAndSample(std::span<const ForwardSeq> fwd, const std::vector<Sequence*>& included,
                                      const std::vector<int32_t>& sample_rows, std::vector<int32_t>* tokens) {
  tokens->assign(sample_rows.size(), -1);
  Backend& backend = *model_->backend();
  std::vector<SparseStepSeq> sparse_seqs;
  if (options_.sparse != nullptr) {
    for (Sequence* s : included) sparse_seqs.push_back({s->id, s->budget});
  }
  // Teacher-forced rows take their token from the request; observed rows need the logits on the host.
  bool observed = false;
  for (int32_t i : sample_rows) observed |= static_cast<bool>(included[i]->req.logits_observer);
  auto choose = [&](size_t j, int32_t sampled) {
    const Sequence& s = *included[sample_rows[j]];
    (*tokens)[j] = s.req.forced_tokens.empty() ? sampled : s.req.forced_tokens[s.stats.generated_tokens];
  };
  if (options_.device_sampling && backend.device_sampling() && !observed) {
    absl::StatusOr<Tensor> logits = options_.sparse == nullptr ? model_->ForwardDevice(fwd, /*all_tokens=*/false)
                                                               : options_.sparse->ForwardDevice(fwd, sparse_seqs);
    // Sparse hooks without device logits refuse before doing anything: then sample on the host below.
    if (!absl::IsUnimplemented(logits.status())) {
      RETURN_IF_ERROR(logits.status());
      if (sample_rows.empty()) return absl::OkStatus();  // prompt chunks only
      // Every row is selected (rows without a token this step, greedily: cheaper than a gather); only the
      // sampled rows draw from their request's generator, as the host sampler would.
      std::vector<TokenSampling> rows(fwd.size());
      for (int32_t i : sample_rows) {
        Sampler& sampler = included[i]->sampler;
        const SamplingParams& p = sampler.params();
        rows[i] = TokenSampling{p.temperature, p.top_k, p.top_p, sampler.greedy() ? 0.0f : sampler.NextUniform()};
      }
      std::vector<int32_t> all(fwd.size());
      RETURN_IF_ERROR(backend.SampleTokens(*logits, rows, all));
      for (size_t j = 0; j < sample_rows.size(); ++j) choose(j, all[sample_rows[j]]);
      return absl::OkStatus();
    }
  }
  const int64_t vocab = model_->config().vocab_size;
  Tensor logits = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(fwd.size()), vocab});
  if (options_.sparse != nullptr) {
    RETURN_IF_ERROR(options_.sparse->Forward(fwd, sparse_seqs, &logits));
  } else {
    RETURN_IF_ERROR(model_->Forward(fwd, /*all_tokens=*/false, &logits));
  }
  // Sampling reads a whole vocabulary row per sequence: run the rows in parallel (each sequence owns its
  // sampler); the caller emits in order on its thread (callbacks are not thread-safe).
  auto row = [&](int32_t i) { return std::span<const float>(logits.as<float>() + i * vocab, static_cast<size_t>(vocab)); };
  for (int32_t i : sample_rows) {
    const Sequence& s = *included[i];
    if (s.req.logits_observer) s.req.logits_observer(s.stats.generated_tokens, row(i));
  }
  ParallelFor(static_cast<int64_t>(sample_rows.size()), 8 * vocab, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Sequence& s = *included[sample_rows[j]];
      choose(static_cast<size_t>(j), s.req.forced_tokens.empty() ? s.sampler.Sample(row(sample_rows[j])) : -1);
    }
  });
  return absl::OkStatus();
}

SparseEngineStats Engine::sparse_stats() const {
  return options_.sparse != nullptr ? options_.sparse->stats() : SparseEngineStats{};
}

absl::StatusOr<GenerationResult> Engine::Generate(GenerationRequest request, const StreamCallback& callback) {
  GenerationResult result;
  bool done = false;
  absl::Status error;
  ASSIGN_OR_RETURN(uint64_t id, Submit(std::move(request), [&](const StreamEvent& ev) {
                     if (ev.token >= 0) result.tokens.push_back(ev.token);
                     result.text += ev.text;
                     if (ev.done) {
                       done = true;
                       result.reason = ev.reason;
                       result.stats = ev.stats;
                       error = ev.status;
                     }
                     if (callback) callback(ev);
                   }));
  (void)id;
  while (!done) RETURN_IF_ERROR(Step());
  RETURN_IF_ERROR(error);
  return result;
}

}  // namespace specontext
