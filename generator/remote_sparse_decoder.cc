#include "generator/remote_sparse_decoder.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"
#include "generator/remote_sparse_stream.h"

namespace specontext::generator {

RemoteSparseDecoder::RemoteSparseDecoder(Transformer* model, RemoteSparseOptions options)
    : model_(model), options_(std::move(options)) {}

absl::StatusOr<std::shared_ptr<RemoteSparseDecoder>> RemoteSparseDecoder::Create(Transformer* model,
                                                                                 RemoteSparseOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("remote sparse decoding needs a model");
  const int64_t context = model->config().max_position_embeddings;
  if (options.budget < 1 || options.budget > context) {
    return absl::InvalidArgumentError(absl::StrCat("--budget must be in [1, ", context, "], got ", options.budget));
  }
  if (options.sink < 0 || options.sink > options.budget) {
    return absl::InvalidArgumentError(absl::StrCat("--sink must be in [0, --budget], got ", options.sink));
  }
  if (absl::Status st = ValidateMaxContext(options.max_context, options.budget, context); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--max-context: ", st.message()));
  }
  std::shared_ptr<RemoteSparseDecoder> d(new RemoteSparseDecoder(model, std::move(options)));
  RETURN_IF_ERROR(d->MakePlanner());
  d->connector_ = std::thread([raw = d.get()] { raw->ConnectLoop(); });
  return d;
}

RemoteSparseDecoder::~RemoteSparseDecoder() {
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    s = stream_;
  }
  if (s != nullptr) s->context.TryCancel();  // unblocks its reader
  if (connector_.joinable()) connector_.join();
  {
    absl::MutexLock lock(&mu_);
    s = std::move(stream_);
  }
  if (s != nullptr) {
    s->context.TryCancel();
    if (s->reader.joinable()) s->reader.join();
  }
}

absl::StatusOr<std::unique_ptr<SequenceKv>> RemoteSparseDecoder::AllocateKv(uint64_t id, int32_t capacity,
                                                                            int32_t budget) {
  budget = std::max(1, std::min(budget, capacity));
  RETURN_IF_ERROR(CheckWithinMaxContext(capacity, options_.max_context));
  // As SparseDecoder: device rows for the first chunk, planned for before they are allocated.
  const int32_t rows = DeviceRowsFor(1, capacity, options_.kv_grow_rows);
  RETURN_IF_ERROR(tiers_->Plan(DeviceRowsInFlight() + rows, static_cast<int32_t>(seqs_.size()) + 1, TierSeqs()));
  std::shared_ptr<HostKvAllocator> host = ScopedHostKvAllocator::Current();  // the kvstore tier, if any
  if (host == nullptr) host = host_cache_;
  ASSIGN_OR_RETURN(std::unique_ptr<SequenceKv> kv, AllocateTieredKv(*model_->backend(), model_->config(), capacity,
                                                                    tiers_->gpu_layers(), budget, std::move(host),
                                                                    rows));
  Seq& seq = seqs_[id];
  seq = Seq{};
  seq.kv = kv.get();
  seq.capacity = capacity;
  seq.rows = rows;
  seq.budget = budget;
  const int32_t n_sets = options_.batch_level ? 1 : static_cast<int32_t>(model_->config().num_key_value_heads);
  seq.map = std::make_unique<SlotMap>(n_sets, budget);
  if (std::shared_ptr<Stream> s = Usable(); s != nullptr && seq.session != s->generation) {
    v1::RetrieverRequest open;
    open.mutable_open()->set_sequence_id(id);
    open.mutable_open()->set_max_tokens(capacity);
    if (Send(*s, open)) {
      seq.session = s->generation;
    } else {
      MarkBroken(s);
    }
  }
  return kv;
}

void RemoteSparseDecoder::Release(uint64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  const uint64_t session = it->second.session;
  seqs_.erase(it);
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock lock(&mu_);
    s = stream_;
  }
  if (s != nullptr && session == s->generation) {
    v1::RetrieverRequest close;
    close.mutable_close()->set_sequence_id(id);
    if (!Send(*s, close)) MarkBroken(s);
  }
}

namespace {

// The proto's index sets (one Select's answer) into core/sparse's struct, reusing its buffers; not validated
// (ValidateSelection does that).
void FromProto(const v1::IndexSets& p, IndexSets* s) {
  s->n_seqs = p.n_seqs();
  s->n_kv_heads = p.n_kv_heads();
  s->sets_per_seq = p.sets_per_seq();
  s->budget = p.budget();
  s->seq_len.assign(p.seq_len().begin(), p.seq_len().end());
  s->indptr.assign(p.indptr().begin(), p.indptr().end());
  s->indices.assign(p.indices().begin(), p.indices().end());
}

}  // namespace

absl::Status ValidateSelection(const IndexSets& sets, std::span<const int32_t> past,
                               int32_t n_kv_heads, int32_t sets_per_seq, int32_t budget) {
  RETURN_IF_ERROR(ValidateIndexSets(sets));
  if (sets.n_seqs != static_cast<int32_t>(past.size()) || sets.n_kv_heads != n_kv_heads ||
      sets.sets_per_seq != sets_per_seq) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout ", sets.n_seqs, " sequences x ", sets.sets_per_seq, " sets of ", sets.n_kv_heads,
        " KV heads, expected ", past.size(), " x ", sets_per_seq, " of ", n_kv_heads));
  }
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    if (sets.seq_len[i] != past[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, ": seq_len ", sets.seq_len[i], ", its past is ", past[i]));
    }
  }
  for (int32_t s = 0; s < sets.n_sets(); ++s) {
    if (const int32_t n = sets.indptr[s + 1] - sets.indptr[s]; n > budget) {
      return absl::InvalidArgumentError(
          absl::StrCat("set ", s, " holds ", n, " positions, budget ", budget));
    }
  }
  return absl::OkStatus();
}

void RemoteSparseDecoder::EndPhase(double* phase) {
  const absl::Time now = absl::Now();
  *phase += absl::ToDoubleSeconds(now - phase_start_);
  phase_start_ = now;
}

bool RemoteSparseDecoder::SelectRemote(std::span<Seq* const> seqs, std::span<const uint64_t> ids,
                                       std::span<const int32_t> past, IndexSets* out) {
  std::shared_ptr<Stream> s = Usable();
  if (s == nullptr) return false;
  const absl::Time t0 = absl::Now();
  const absl::Time deadline = t0 + options_.step_deadline;
  // One Select per distinct budget (the service takes one budget per Select), merged in batch order:
  // sequence i is row row_of_[i] of group group_of_[i]'s answer. One group (the usual step) answers into *out.
  group_budgets_.clear();
  for (Seq* q : seqs) group_budgets_.push_back(q->budget);
  std::sort(group_budgets_.begin(), group_budgets_.end());
  group_budgets_.erase(std::unique(group_budgets_.begin(), group_budgets_.end()), group_budgets_.end());
  const size_t n_groups = group_budgets_.size();
  group_of_.assign(seqs.size(), 0);
  row_of_.assign(seqs.size(), 0);
  std::vector<int32_t> group_rows(n_groups, 0);
  for (size_t i = 0; i < seqs.size() && n_groups > 1; ++i) {
    const auto at = std::lower_bound(group_budgets_.begin(), group_budgets_.end(), seqs[i]->budget);
    group_of_[i] = static_cast<int32_t>(at - group_budgets_.begin());
    row_of_[i] = group_rows[group_of_[i]]++;
  }
  if (n_groups > 1 && answers_.size() < n_groups) answers_.resize(n_groups);
  const int32_t n_kv = static_cast<int32_t>(model_->config().num_key_value_heads);
  std::vector<int32_t> group_past;
  for (size_t g = 0; g < n_groups; ++g) {
    v1::RetrieverRequest req;
    v1::Select* sel = req.mutable_select();
    group_past.clear();
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (group_of_[i] != static_cast<int32_t>(g)) continue;
      sel->add_sequence_ids(ids[i]);
      group_past.push_back(past[i]);
    }
    sel->set_budget(group_budgets_[g]);
    sel->set_sink(std::min(options_.sink, group_budgets_[g]));
    sel->set_batch_level(options_.batch_level);
    const uint64_t step = ++step_;
    sel->set_step(step);
    if (!Send(*s, req)) {
      MarkBroken(s);
      return false;
    }
    // Wait for this step's answer; answers of earlier (abandoned) steps are dropped.
    std::optional<v1::RetrieverResponse> got;
    {
      absl::MutexLock lock(&s->mu);
      while (!got.has_value()) {
        while (!s->inbox.empty()) {
          v1::RetrieverResponse r = std::move(s->inbox.front());
          s->inbox.pop_front();
          if (r.has_selection() && r.selection().step() == step) {
            got = std::move(r);
            break;
          }
          if (r.has_error()) {
            SPC_LOG(WARNING) << "retriever error" << Kv("sequence", r.error().sequence_id())
                             << Kv("message", r.error().message());
          }
        }
        if (got.has_value() || s->broken) break;
        auto ready = [&s] { return !s->inbox.empty() || s->broken; };
        if (!s->mu.AwaitWithDeadline(absl::Condition(&ready), deadline)) break;
      }
    }
    EndPhase(&step_secs_.select_wait);
    if (!got.has_value()) return false;  // late or down: this step falls back
    if (got->has_error()) {
      SPC_LOG(WARNING) << "retriever select failed" << Kv("message", got->error().message());
      s->resynced = false;  // the session may have lost sequences: re-open them next step
      return false;
    }
    IndexSets* answer = n_groups == 1 ? out : &answers_[g];
    FromProto(got->selection().sets(), answer);
    const absl::Status valid =
        ValidateSelection(*answer, group_past, n_kv, options_.batch_level ? 1 : n_kv, group_budgets_[g]);
    if (!valid.ok()) {
      // Checked here, not in the forward: there it would fail every stream of the batch.
      if (!s->malformed_logged) {
        s->malformed_logged = true;
        SPC_LOG(WARNING)
            << "retriever sent malformed index sets; such steps fall back (logged once per session)"
            << Kv("step", step) << Kv("status", valid.ToString());
      }
      EndPhase(&step_secs_.selection);
      return false;
    }
    double mass = 0;
    for (float m : got->selection().attention_mass()) mass += m;
    if (got->selection().attention_mass_size() > 0) last_mass_ = mass / got->selection().attention_mass_size();
    EndPhase(&step_secs_.selection);
  }
  if (options_.retrieval_latency != nullptr) {
    options_.retrieval_latency->Observe(absl::ToDoubleSeconds(absl::Now() - t0));
  }
  if (n_groups == 1) return true;
  out->n_seqs = static_cast<int32_t>(ids.size());
  out->n_kv_heads = answers_[0].n_kv_heads;
  out->sets_per_seq = answers_[0].sets_per_seq;
  out->budget = 0;
  out->seq_len.clear();
  out->indptr.assign(1, 0);
  out->indices.clear();
  for (size_t g = 0; g < n_groups; ++g) out->budget = std::max(out->budget, answers_[g].budget);
  for (size_t i = 0; i < ids.size(); ++i) {
    const IndexSets& a = answers_[group_of_[i]];
    const int32_t row = row_of_[i];
    out->seq_len.push_back(a.seq_len[row]);
    for (int32_t h = 0; h < a.sets_per_seq; ++h) {
      const int32_t set = row * a.sets_per_seq + h;
      out->indices.insert(out->indices.end(), a.indices.begin() + a.indptr[set], a.indices.begin() + a.indptr[set + 1]);
      out->indptr.push_back(static_cast<int32_t>(out->indices.size()));
    }
  }
  EndPhase(&step_secs_.selection);
  return true;
}

absl::Status RemoteSparseDecoder::Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps,
                                          Tensor* logits) {
  return Run(fwd, steps, logits, /*device=*/false);
}

absl::StatusOr<Tensor> RemoteSparseDecoder::ForwardDevice(std::span<const ForwardSeq> fwd,
                                                          std::span<const SparseStepSeq> steps) {
  Tensor logits;
  RETURN_IF_ERROR(Run(fwd, steps, &logits, /*device=*/true));
  return logits;
}

absl::Status RemoteSparseDecoder::Run(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps,
                                      Tensor* logits, bool device) {
  const absl::Time start = absl::Now();
  phase_start_ = start;
  const absl::Status st = RunPasses(fwd, steps, logits, device);
  step_secs_.total += absl::ToDoubleSeconds(absl::Now() - start);
  ++step_secs_.steps;
  absl::MutexLock lock(&secs_mu_);
  published_secs_ = step_secs_;
  return st;
}

absl::StatusOr<HiddenCapture*> RemoteSparseDecoder::PrepareCapture(int64_t n_tokens) {
  if (fused_width_ == 0) return nullptr;
  capture_.layers = fusion_layers_;
  RETURN_IF_ERROR(PrepareDeviceCapture(*model_->backend(), n_tokens, fused_width_, &capture_buffer_, &capture_));
  return &capture_;
}

absl::Status RemoteSparseDecoder::DownloadCapture() {
  const Tensor& d = capture_.out;  // [n, fused_width] compute dtype
  const size_t values = static_cast<size_t>(d.numel());
  captured_.resize(values);
  if (d.dtype() == DType::kF32) {
    Tensor host(captured_.data(), DType::kF32, d.shape());
    return model_->backend()->ToHost(d, &host);
  }
  capture_host_.resize(values * DTypeSize(d.dtype()));
  Tensor host(capture_host_.data(), d.dtype(), d.shape());
  RETURN_IF_ERROR(model_->backend()->ToHost(d, &host));
  ConvertToF32(capture_host_.data(), d.dtype(), captured_.data(), values);
  return absl::OkStatus();
}

absl::Status RemoteSparseDecoder::RunPasses(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> steps,
                                            Tensor* logits, bool device) {
  if (fwd.size() != steps.size()) return absl::InvalidArgumentError("sparse forward: one SparseStepSeq per sequence");
  RETURN_IF_ERROR(PlanLayers(fwd, steps));
  EndPhase(&step_secs_.plan_layers);
  const int64_t vocab = model_->config().vocab_size;
  // As SparseDecoder: prompt chunks and decode tokens run as two forwards (uniform attention per forward).
  for (int pass = 0; pass < 2; ++pass) {
    // Scratch reused across steps (pass 0 is done with them before pass 1 refills them).
    std::vector<ForwardSeq>& part = pass_fwd_;
    std::vector<Seq*>& seqs = pass_seqs_;
    std::vector<uint64_t>& ids = pass_ids_;
    std::vector<size_t>& rows = pass_rows_;
    part.clear();
    seqs.clear();
    ids.clear();
    rows.clear();
    for (size_t i = 0; i < fwd.size(); ++i) {
      if (IsDecodeRow(fwd[i]) != (pass == 1)) continue;
      auto it = seqs_.find(steps[i].id);
      if (it == seqs_.end() || it->second.kv != fwd[i].kv) {
        return absl::FailedPreconditionError(absl::StrCat("sparse forward: sequence ", steps[i].id,
                                                          " was not allocated by this decoder"));
      }
      part.push_back(fwd[i]);
      seqs.push_back(&it->second);
      ids.push_back(steps[i].id);
      rows.push_back(i);
    }
    if (part.empty()) continue;
    std::shared_ptr<Stream> s = Usable();
    const int64_t fw = fused_width_;
    for (Seq* q : seqs) {
      if (fw > 0 && q->tokens.empty()) q->last_features.assign(fw, 0.0f);  // position 0 pairs with zeros
    }
    // The pass's observes go out as one ObserveBatch (the retriever runs one head forward over them), before
    // the pass's Select (SelectRemote, in Decode).
    PendingObserves batch;
    auto observe = [&](size_t j, const float* fused) {
      if (!ObserveTokens(s.get(), batch, ids[j], *seqs[j], part[j].tokens, fused) && s != nullptr) {
        MarkBroken(s);
        s = nullptr;
      }
    };
    auto flush = [&] {
      if (s != nullptr && !FlushObserves(*s, batch)) {
        MarkBroken(s);
        s = nullptr;
      }
    };
    // Decode tokens go to the retriever first (it computes their K while we run the forward): their fused
    // row, the previous position's features, is known. A prompt chunk's rows come from its own forward.
    if (pass == 1 || fw == 0) {
      for (size_t j = 0; j < part.size(); ++j) {
        observe(j, fw > 0 && seqs[j]->last_features.size() == static_cast<size_t>(fw) ? seqs[j]->last_features.data()
                                                                                      : nullptr);
      }
      flush();
    }
    EndPhase(&step_secs_.observe);
    int64_t n_tokens = 0;
    for (const ForwardSeq& f : part) n_tokens += static_cast<int64_t>(f.tokens.size());
    ASSIGN_OR_RETURN(HiddenCapture * cap, PrepareCapture(n_tokens));
    const int64_t n_part = static_cast<int64_t>(part.size()), n_all = static_cast<int64_t>(fwd.size());
    Tensor out = pass_logits_.Target(*logits, n_part, n_all, vocab, device);
    if (pass == 1) {
      RETURN_IF_ERROR(Decode(part, seqs, ids, &out, cap, device));
    } else if (device) {
      ASSIGN_OR_RETURN(out, model_->ForwardDevice(part, /*all_tokens=*/false, nullptr, cap));
      EndPhase(&step_secs_.forward);
    } else {
      RETURN_IF_ERROR(model_->Forward(part, /*all_tokens=*/false, &out, nullptr, cap));
      EndPhase(&step_secs_.forward);
    }
    if (cap != nullptr) {
      RETURN_IF_ERROR(DownloadCapture());
      EndPhase(&step_secs_.features);
      int64_t row = 0;
      for (size_t j = 0; j < part.size(); ++j) {
        const int64_t n = static_cast<int64_t>(part[j].tokens.size());
        if (pass == 0) {
          std::vector<float> prompt_rows = PromptFeatures(*seqs[j], captured_.data(), row, n);
          observe(j, seqs[j]->last_features.size() == static_cast<size_t>(fw) ? prompt_rows.data() : nullptr);
        }
        row += n;
        seqs[j]->last_features.assign(captured_.data() + (row - 1) * fw, captured_.data() + row * fw);
      }
      flush();
      EndPhase(&step_secs_.observe);
    }
    RETURN_IF_ERROR(pass_logits_.Place(*model_->backend(), out, rows, n_all, device, logits));
    EndPhase(&step_secs_.logits);
  }
  return absl::OkStatus();
}

SparseEngineStats RemoteSparseDecoder::stats() const {
  SparseEngineStats s = stats_;
  s.gpu_layers = tiers_->gpu_layers();
  s.offloaded_layers = tiers_->n_layers() - tiers_->gpu_layers();
  s.layer_moves = tiers_->counters().moves;
  s.layer_returns = tiers_->counters().returns;
  s.layer_move_seconds = tiers_->counters().seconds;
  s.host_kv_bytes = model_->backend()->host_memory_report().total;
  s.device_bytes = model_->backend()->memory_report().total;
  s.last_captured_mass = last_mass_;
  return s;
}

RetrievalPathStats RemoteSparseDecoder::path_stats() const {
  RetrievalPathStats r;
  {
    absl::MutexLock lock(&secs_mu_);
    r.step_seconds = published_secs_;
  }
  r.remote_steps = remote_steps_;
  r.fallback_steps = fallback_steps_;
  r.reconnects = reconnects_;
  r.connected = connected_;
  return r;
}

}  // namespace specontext::generator
