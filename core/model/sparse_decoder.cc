#include "core/model/sparse_decoder.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/model/pass_outputs.h"
#include "core/model/sparse_decoder_state.h"
#include "core/model/sparse_tensor_parallel.h"
#include "core/sparse/elastic.h"
#include "core/status_macros.h"

namespace specontext {

namespace {

using PhaseClock = std::chrono::steady_clock;

// Seconds since *t, and *t moved to now (one clock read per phase boundary).
double Lap(PhaseClock::time_point& t) {
  const PhaseClock::time_point now = PhaseClock::now();
  const double s = std::chrono::duration<double>(now - t).count();
  t = now;
  return s;
}

// A view of `t`'s storage from element `offset` with `shape` (no copy).
Tensor View(const Tensor& t, int64_t offset, Shape shape) {
  return Tensor(static_cast<char*>(t.data()) + offset * DTypeSize(t.dtype()), t.dtype(), std::move(shape), t.device(),
                t.storage());
}

// Step-graph keys of ObserveDecode: bit 62 (the Transformer's keys stay below it, sparse ones set bit
// 63), the decoder's id above bit 24, the batch size below.
constexpr uint64_t kHeadGraphBit = uint64_t{1} << 62;
constexpr int kHeadGraphIdShift = 24;

uint64_t NextDecoderId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

}  // namespace

SparseDecoder::SparseDecoder(Transformer* model, const RetrievalHead* head, const SparseOptions& options)
    : model_(model), head_(head), options_(options), graph_id_(NextDecoderId()) {}

// The head's step graphs stay with the backend (freed with it; their keys are this decoder's alone, so they
// are never replayed again): the backend may already be gone when a decoder held by hooks dies (the
// generator's engine options outlive its runtime), so the destructor must not touch it.
SparseDecoder::~SparseDecoder() = default;

absl::StatusOr<std::unique_ptr<SparseDecoder>> SparseDecoder::Create(Transformer* model, const RetrievalHead* head,
                                                                     const SparseOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("sparse decoding needs a model");
  if (head == nullptr && options.source == SelectionSource::kHead) {
    return absl::InvalidArgumentError("sparse decoding with the head selection source needs a retrieval head");
  }
  if (options.fallback_mass != 0 && (options.source != SelectionSource::kHead || !(options.fallback_mass > 0 &&
                                                                                   options.fallback_mass <= 1))) {
    return absl::InvalidArgumentError(absl::StrCat("weak-retrieval fallback mass must be in (0, 1] with the head ",
                                                   "selection source, got ", options.fallback_mass, " with ",
                                                   SelectionSourceName(options.source)));
  }
  const ModelConfig& c = model->config();
  // Under tensor parallelism the head is replicated: it fits the whole model, not the rank's shard.
  const TensorParallel& tp = model->tensor_parallel();
  RETURN_IF_ERROR(ValidateSparseTensorParallel(options, tp));
  const ModelConfig whole = UnshardedConfig(c, tp);
  if (head != nullptr) RETURN_IF_ERROR(ValidateHeadForTarget(head->config(), whole));
  if (head != nullptr && head->n_kv_heads() != whole.num_key_value_heads) {
    return absl::FailedPreconditionError(absl::StrCat("retrieval head has ", head->n_kv_heads(),
                                                      " KV heads but the model has ", whole.num_key_value_heads));
  }
  if (head != nullptr && head->n_heads() % tp.size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp.size, " does not divide the retrieval "
                                                   "head's ", head->n_heads(), " query heads"));
  }
  {
    absl::Status st = ValidateBudget(options.budget, options.sink, c.max_position_embeddings);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("--budget/--sink: ", st.message()));
  }
  RETURN_IF_ERROR(ValidateMaxContext(options.max_context, options.budget, c.max_position_embeddings));
  if (options.kv_grow_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV growth step must be >= 0 tokens, got ", options.kv_grow_rows));
  }
  if (!(options.synthetic_overlap >= 0.0 && options.synthetic_overlap <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic overlap must be in [0, 1], got ",
                                                   options.synthetic_overlap));
  }
  if (options.step.max_tokens_per_step < 1 || options.step.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("sparse step shape must be >= 1 token and sequence, got ",
                                                   options.step.max_tokens_per_step, " tokens, ",
                                                   options.step.max_batch, " sequences"));
  }
  const int32_t context = static_cast<int32_t>(ContextLimit(options.max_context, c.max_position_embeddings));
  const bool recall = static_cast<bool>(options.recall_observer);
  std::unique_ptr<SparseDecoder> d(new SparseDecoder(model, head, options));
  // Under TP the sets are taken on the host right after selection: TakeSelection addresses batch-level sets
  // to the rank's KV heads before anything reads their layout.
  if (tp.size > 1) d->options_.defer_selection = false;
  if (options.synthetic_overlap > 0) d->synthetic_.emplace(options.synthetic_overlap);
  d->layer_spec_.source = options.source;
  d->layer_spec_.sink = options.sink;
  d->layer_spec_.mode = options.mode;
  if (head == nullptr) {
    ASSIGN_OR_RETURN(std::optional<MemoryPlanner> planner,
                     MakeMeasuredPlanner(*model, options.budget, options.gpu_memory_limit, 0, options.max_context,
                                         SparseStepWorkspaceBytes(*model, nullptr, options.step, context,
                                                                  options.budget, options.mode, recall)));
    d->tiers_.emplace(model->backend(), static_cast<int32_t>(c.num_hidden_layers), std::move(planner),
                      options.kv_grow_rows);
    d->AgreeOnLayerMoves();
    return d;
  }
  // The head's weights go up before the planner measures the device. A head that shares the target's
  // embedding reads the model's table on the backend instead of uploading a second copy (1 GB for an 8B
  // target's head); it was loaded from the same checkpoint tensor, so shape and dtype agree unless the
  // backend stores the two differently, in which case the head keeps its own upload.
  const Tensor* shared = nullptr;
  const Tensor& embed = model->embedding();
  if (!head->config().own_embedding && !embed.empty() &&
      embed.shape() == Shape{head->config().attn.vocab_size, head->config().attn.hidden_size} &&
      embed.dtype() == model->backend()->weight_dtype(head->embedding_dtype())) {
    shared = &embed;
  }
  ASSIGN_OR_RETURN(d->dhead_, DeviceRetrievalHead::Create(*head, model->backend(), shared));
  ASSIGN_OR_RETURN(std::optional<MemoryPlanner> planner,
                   MakeMeasuredPlanner(*model, options.budget, options.gpu_memory_limit,
                                       d->dhead_->cache_bytes_per_token(), options.max_context,
                                       SparseStepWorkspaceBytes(*model, d->dhead_.get(), options.step, context,
                                                                options.budget, options.mode, recall,
                                                                options.fallback_mass > 0)));
  d->tiers_.emplace(model->backend(), static_cast<int32_t>(c.num_hidden_layers), std::move(planner),
                    options.kv_grow_rows);
  d->AgreeOnLayerMoves();
  return d;
}

void SparseDecoder::AgreeOnLayerMoves() {
  const TensorParallel& tp = model_->tensor_parallel();
  if (tp.size <= 1) return;
  Communicator* comm = tp.comm;
  Backend* backend = model_->backend();
  auto scratch = std::make_shared<Tensor>();  // the all-reduce's [size] buffer, allocated by the first plan
  tiers_->set_agreement([comm, backend, scratch](const absl::StatusOr<int32_t>& target) {
    return AgreeOnGpuLayers(*comm, *backend, target, scratch.get());
  });
}

Tensor SparseDecoder::SelectionPart(const Tensor& t) const {
  // Head-level sets are per KV head, so the rank's sets need only its KV heads' query and K-cache heads;
  // batch-level ones take a max over every query head, so every rank scores them all.
  return options_.mode == SelectionMode::kHeadLevel ? RankPart(t, model_->tensor_parallel()) : t;
}

absl::StatusOr<int32_t> SparseDecoder::TakeHiddenSlot() {
  Backend& b = *model_->backend();
  const int64_t fw = head_->fused_width();
  if (free_hidden_slots_.empty()) {
    // Grow the pool (rare: admissions past the largest batch so far), keeping the live rows.
    const int64_t old = hidden_pool_.empty() ? 0 : hidden_pool_.dim(0), grown = std::max<int64_t>(8, 2 * old);
    ASSIGN_OR_RETURN(Tensor pool, b.Alloc(b.compute_dtype(), {grown, fw}, MemoryKind::kRetrieval));
    if (old > 0) {
      Tensor head_rows = View(pool, 0, {old, fw});
      RETURN_IF_ERROR(b.CopyDevice(hidden_pool_, &head_rows));
    }
    hidden_pool_ = std::move(pool);
    for (int64_t s = grown - 1; s >= old; --s) free_hidden_slots_.push_back(static_cast<int32_t>(s));
  }
  const int32_t slot = free_hidden_slots_.back();
  free_hidden_slots_.pop_back();
  Tensor row = View(hidden_pool_, slot * fw, {1, fw});
  RETURN_IF_ERROR(b.Zero(&row));  // position 0 pairs with zeros (EAGLE-3)
  return slot;
}

absl::StatusOr<std::unique_ptr<SequenceKv>> SparseDecoder::AllocateKv(uint64_t id, int32_t capacity, int32_t budget) {
  budget = std::max(1, std::min(budget, capacity));
  const ModelConfig& c = model_->config();
  RETURN_IF_ERROR(CheckWithinMaxContext(capacity, options_.max_context));
  // Device rows for the first chunk only; PlanLayers grows them before each forward that needs more. The
  // planner sees them first, so an admission moves layers to host rather than failing.
  const int32_t rows = DeviceRowsFor(1, capacity, options_.kv_grow_rows);
  RETURN_IF_ERROR(tiers_->Plan(DeviceRowsInFlight() + rows, static_cast<int32_t>(seqs_.size()) + 1, TierSeqs()));
  std::shared_ptr<HostKvAllocator> host = ScopedHostKvAllocator::Current();
  if (host == nullptr) host = host_cache_;
  ASSIGN_OR_RETURN(std::unique_ptr<SequenceKv> kv,
                   AllocateTieredKv(*model_->backend(), c, capacity, tiers_->gpu_layers(), budget, std::move(host),
                                    rows));
  const int32_t n_sets = options_.mode == SelectionMode::kHeadLevel ? static_cast<int32_t>(c.num_key_value_heads) : 1;
  auto st = std::make_unique<SeqState>(n_sets, budget);
  st->id = id;
  st->kv = kv.get();
  st->capacity = capacity;
  st->rows = rows;
  if (head_ != nullptr) {
    ASSIGN_OR_RETURN(st->cache, dhead_->AllocateCache(rows));
  }
  if (head_ != nullptr && head_->fused_width() > 0) {
    ASSIGN_OR_RETURN(st->hidden_slot, TakeHiddenSlot());
  }
  Release(id);  // an id reused without Release must not leak its hidden slot
  seqs_[id] = std::move(st);
  return kv;
}

void SparseDecoder::Release(uint64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  if (it->second->hidden_slot >= 0) free_hidden_slots_.push_back(it->second->hidden_slot);
  seqs_.erase(it);
}

const Tensor* SparseDecoder::retrieval_cache(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second->cache;
}

int32_t SparseDecoder::retrieval_len(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? 0 : it->second->cache_len;
}

const SlotMap* SparseDecoder::slot_map(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second->map;
}

absl::Status SparseDecoder::OffloadLayers(int32_t gpu_layers) { return tiers_->Offload(gpu_layers, TierSeqs()); }

std::span<const TierSeq> SparseDecoder::TierSeqs() {
  tier_seqs_.clear();
  for (const auto& [id, st] : seqs_) {
    tier_seqs_.push_back({st->kv, st->budget, st->rows, st->capacity});
  }
  return tier_seqs_;
}

int64_t SparseDecoder::DeviceRowsInFlight() const {
  int64_t rows = 0;
  for (const auto& [id, st] : seqs_) rows += st->rows;
  return rows;
}

absl::Status SparseDecoder::PlanLayers(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs) {
  // The planner plans for the rows the device will hold after this step (not tokens: a growth chunk's unused
  // tail is memory too), so layers move to host before a growth needs their memory.
  grow_.clear();
  int64_t total = DeviceRowsInFlight();
  for (size_t i = 0; i < fwd.size(); ++i) {
    auto it = seqs_.find(seqs[i].id);
    if (it == seqs_.end() || it->second->kv != fwd[i].kv) continue;  // Forward reports it
    SeqState* st = it->second.get();
    const int32_t rows = DeviceRowsFor(fwd[i].past_len + static_cast<int32_t>(fwd[i].tokens.size()), st->capacity,
                                       options_.kv_grow_rows);
    if (rows <= st->rows) continue;
    total += rows - st->rows;
    grow_.push_back({st, rows});
  }
  RETURN_IF_ERROR(tiers_->Plan(total, static_cast<int32_t>(seqs_.size()), TierSeqs()));
  Backend& b = *model_->backend();
  PhaseClock::time_point t = PhaseClock::now();
  for (const auto& [st, rows] : grow_) {
    RETURN_IF_ERROR(GrowDeviceKv(b, st->kv, rows));
    if (!st->cache.empty()) RETURN_IF_ERROR(GrowHeadRows(b, &st->cache, rows, MemoryKind::kRetrieval));
    st->rows = rows;
    ++stats_.kv_grows;
  }
  if (!grow_.empty()) stats_.kv_grow_seconds += Lap(t);
  return absl::OkStatus();
}

absl::StatusOr<HiddenCapture*> SparseDecoder::PrepareCapture(int64_t n_tokens) {
  const int64_t fw = head_ != nullptr ? head_->fused_width() : 0;
  if (fw == 0) return nullptr;
  capture_.layers.clear();
  for (int64_t l : head_->config().fusion_layers) capture_.layers.push_back(static_cast<int32_t>(l));
  RETURN_IF_ERROR(PrepareDeviceCapture(*model_->backend(), n_tokens, fw, &capture_buffer_, &capture_));
  return &capture_;
}

absl::Status SparseDecoder::ObserveDecode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                          Tensor* q) {
  Backend& b = *model_->backend();
  const DType dt = b.compute_dtype();
  const int64_t n = static_cast<int64_t>(fwd.size()), fw = head_->fused_width();
  const int64_t vocab = head_->config().attn.vocab_size;
  DecodeHead& g = decode_heads_[n];
  if (g.io.empty()) {
    ASSIGN_OR_RETURN(g.io, b.Alloc(DType::kI32, {3, n}, MemoryKind::kRetrieval));
    // q then k in one block: at n = 1 the head's projection writes both at once (DeviceRetrievalHead::Forward).
    const int64_t nq = head_->n_heads(), nkv = head_->n_kv_heads(), hd = head_->head_dim();
    ASSIGN_OR_RETURN(Tensor qk, b.Alloc(dt, {n * (nq + nkv) * hd}, MemoryKind::kRetrieval));
    g.q = View(qk, 0, {n, nq, hd});
    g.k = View(qk, n * nq * hd, {n, nkv, hd});
  }
  // io = [ids][positions][pool rows], one upload; the K rows go to each cache at its length after the graph.
  ids_.assign(3 * n, 0);
  scatter_.clear();
  for (int64_t i = 0; i < n; ++i) {
    SeqState& st = *states[i];
    if (st.cache_len != fwd[i].past_len) {
      return absl::InternalError(absl::StrCat("retrieval cache holds ", st.cache_len, " tokens, sequence has ",
                                              fwd[i].past_len));
    }
    const int32_t id = fwd[i].tokens[0];
    if (id < 0 || id >= vocab) {
      return absl::OutOfRangeError(absl::StrCat("retrieval head: token ", id, " outside the vocabulary of ", vocab));
    }
    ids_[i] = id;
    ids_[n + i] = st.cache_len;
    ids_[2 * n + i] = std::max(st.hidden_slot, 0);
    scatter_.push_back({&st.cache, static_cast<int32_t>(i), 1, st.cache_len});
  }
  RETURN_IF_ERROR(b.CopyToDevice(Tensor(ids_.data(), DType::kI32, {3, n}), &g.io));
  const uint64_t key = kHeadGraphBit | (graph_id_ << kHeadGraphIdShift) | static_cast<uint64_t>(n);
  if (fw > 0 && g.pool != hidden_pool_.data()) {
    // The recording gathers from the pool's old address (it grew): record again.
    b.DropStepGraphs(key, key + 1);
    g.pool = hidden_pool_.data();
  }
  const Tensor ids = View(g.io, 0, {n}), pos = View(g.io, n, {n}), rows = View(g.io, 2 * n, {n});
  RETURN_IF_ERROR(b.RunStepGraph(key, [&]() -> absl::Status {
    Tensor fused;
    if (fw > 0) {
      ASSIGN_OR_RETURN(fused, b.Alloc(dt, {n, fw}, MemoryKind::kWorkspace));
      RETURN_IF_ERROR(b.Embedding(hidden_pool_, rows, &fused));
    }
    return dhead_->Forward(ids, pos, fw > 0 ? &fused : nullptr, &g.q, &g.k);
  }));
  RETURN_IF_ERROR(b.ScatterRows(g.k, scatter_));
  *q = g.q;
  for (SeqState* st : states) ++st->cache_len;
  return absl::OkStatus();
}

absl::Status SparseDecoder::Observe(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                    const HiddenCapture* capture, Tensor* q) {
  bool decode = capture == nullptr && !fwd.empty();
  for (const ForwardSeq& f : fwd) decode = decode && f.tokens.size() == 1;
  if (decode) return ObserveDecode(fwd, states, q);
  Backend& b = *model_->backend();
  const DType dt = b.compute_dtype();
  ids_.clear();
  head_seqs_.clear();
  for (size_t i = 0; i < fwd.size(); ++i) {
    SeqState& st = *states[i];
    if (st.cache_len != fwd[i].past_len) {
      return absl::InternalError(absl::StrCat("retrieval cache holds ", st.cache_len, " tokens, sequence has ",
                                              fwd[i].past_len));
    }
    ids_.insert(ids_.end(), fwd[i].tokens.begin(), fwd[i].tokens.end());
    head_seqs_.push_back({&st.cache, static_cast<int32_t>(fwd[i].tokens.size()), st.cache_len});
  }
  const int64_t n = static_cast<int64_t>(ids_.size()), n_seqs = static_cast<int64_t>(fwd.size());
  ASSIGN_OR_RETURN(*q, b.Alloc(dt, {n, head_->n_heads(), head_->head_dim()}, MemoryKind::kWorkspace));
  Tensor fused;
  const int64_t fw = head_->fused_width();
  if (fw > 0) {
    // EAGLE-3 pairs token t with the target's features of position t-1: a sequence's first new token takes
    // its pool row (the previous forward's last row; zeros at position 0), the others the capture's row
    // before them. gather_ = [pool rows of the sequences][capture rows of every token (first rows: 0)].
    gather_.assign(n_seqs + n, 0);
    int64_t row = 0;
    for (int64_t i = 0; i < n_seqs; ++i) {
      gather_[i] = states[i]->hidden_slot;
      for (size_t j = 1; j < fwd[i].tokens.size(); ++j) gather_[n_seqs + row + j] = static_cast<int32_t>(row + j - 1);
      row += static_cast<int64_t>(fwd[i].tokens.size());
    }
    ASSIGN_OR_RETURN(Tensor idx, b.Alloc(DType::kI32, {n_seqs + n}, MemoryKind::kWorkspace));
    RETURN_IF_ERROR(b.CopyToDevice(Tensor(gather_.data(), DType::kI32, {n_seqs + n}), &idx));
    ASSIGN_OR_RETURN(fused, b.Alloc(dt, {n, fw}, MemoryKind::kWorkspace));
    if (n == n_seqs) {  // one token per sequence (decode): every row comes from the pool
      RETURN_IF_ERROR(b.Embedding(hidden_pool_, View(idx, 0, {n_seqs}), &fused));
    } else {
      if (capture == nullptr || capture->out.shape() != Shape{n, fw}) {
        return absl::InternalError("sparse decoder: eagle3 prompt chunks need the forward's hidden capture");
      }
      RETURN_IF_ERROR(b.Embedding(capture->out, View(idx, n_seqs, {n}), &fused));
      ASSIGN_OR_RETURN(Tensor first, b.Alloc(dt, {n_seqs, fw}, MemoryKind::kWorkspace));
      RETURN_IF_ERROR(b.Embedding(hidden_pool_, View(idx, 0, {n_seqs}), &first));
      Tensor fused_rows = View(fused, 0, {1, n, fw});
      scatter_.clear();
      int32_t first_row = 0;
      for (int64_t i = 0; i < n_seqs; ++i) {
        scatter_.push_back({&fused_rows, static_cast<int32_t>(i), 1, first_row});
        first_row += head_seqs_[i].n_tokens;
      }
      RETURN_IF_ERROR(b.ScatterRows(View(first, 0, {n_seqs, 1, fw}), scatter_));
    }
  }
  RETURN_IF_ERROR(dhead_->Observe(ids_, head_seqs_, fw > 0 ? &fused : nullptr, q));
  for (size_t i = 0; i < fwd.size(); ++i) states[i]->cache_len += static_cast<int32_t>(fwd[i].tokens.size());
  return absl::OkStatus();
}

absl::Status SparseDecoder::KeepLastHidden(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                           const HiddenCapture& capture) {
  const int64_t fw = head_->fused_width(), slots = hidden_pool_.dim(0);
  Tensor pool = View(hidden_pool_, 0, {1, slots, fw});
  scatter_.clear();
  int32_t row = 0;
  for (size_t i = 0; i < fwd.size(); ++i) {
    row += static_cast<int32_t>(fwd[i].tokens.size());
    scatter_.push_back({&pool, row - 1, 1, states[i]->hidden_slot});
  }
  return model_->backend()->ScatterRows(View(capture.out, 0, {capture.out.dim(0), 1, fw}), scatter_);
}

absl::Status SparseDecoder::Prefill(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                    Tensor* logits, bool device) {
  int64_t n = 0;
  for (const ForwardSeq& f : fwd) n += static_cast<int64_t>(f.tokens.size());
  ASSIGN_OR_RETURN(HiddenCapture * cap, PrepareCapture(n));
  if (device) {
    ASSIGN_OR_RETURN(*logits, model_->ForwardDevice(fwd, /*all_tokens=*/false, nullptr, cap));
  } else {
    RETURN_IF_ERROR(model_->Forward(fwd, /*all_tokens=*/false, logits, nullptr, cap));
  }
  if (head_ == nullptr) return absl::OkStatus();
  Tensor q;
  RETURN_IF_ERROR(Observe(fwd, states, cap, &q));
  if (cap != nullptr) RETURN_IF_ERROR(KeepLastHidden(fwd, states, *cap));
  return absl::OkStatus();
}

absl::Status SparseDecoder::Decode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                   Tensor* logits, bool device) {
  const int32_t n_layers = static_cast<int32_t>(model_->config().num_hidden_layers);
  const bool offloaded = tiers_->any_offloaded();
  SparseStepSeconds& secs = stats_.decode_seconds;
  const PhaseClock::time_point start = PhaseClock::now();
  PhaseClock::time_point t = start;
  Tensor q;  // [n_seqs, n_heads, head_dim]: the head's queries of the current tokens, on the backend
  if (head_ != nullptr) {
    RETURN_IF_ERROR(Observe(fwd, states, nullptr, &q));
    secs.observe += Lap(t);
  }
  bool all_small = true;
  for (size_t i = 0; i < fwd.size(); ++i) all_small = all_small && fwd[i].past_len <= states[i]->budget;
  SparseForward sf;
  // Batch-invariant mode: a short sequence must not switch between the dense kernels (alone, or beside other
  // short ones) and the sparse kernel over all its tokens (beside a long one): always the sparse path.
  sf.dense_attention = all_small && !offloaded && !model_->backend()->batch_invariant();
  bool planned = false;
  maps_.clear();
  if (!sf.dense_attention) {
    if (IsPerLayerSource(options_.source) && offloaded) {
      return absl::FailedPreconditionError(absl::StrCat(
          "selection source ", SelectionSourceName(options_.source), " selects in every layer and needs every layer "
          "resident, but ", n_layers - tiers_->gpu_layers(), " of ", n_layers,
          " layers are offloaded (raise --gpu-memory-limit or use head/window)"));
    }
    if (options_.source == SelectionSource::kHead) {
      RETURN_IF_ERROR(SelectWithHead(fwd, states, q, &sf));
    } else {
      SelectWithoutHead(fwd, states, &sf);
    }
    secs.select += Lap(t);
    if (synthetic_.has_value()) {
      prev_.clear();
      for (SeqState* st : states) prev_.push_back(&st->prev_sets);
      RETURN_IF_ERROR(synthetic_->Apply(options_.sink, prev_, &selection_.sets));
      secs.synthetic += Lap(t);
    }
    sf.desc.sets = &selection_.sets;
    sf.desc.positions_on_device = selection_.pending;
    if (offloaded) {
      // Every offloaded layer's copies from one plan (reused every step: planning allocates nothing once
      // its buffers have grown). With the positions still on the device it runs once the resident layers
      // are enqueued, while the GPU computes them.
      auto plan = [&]() -> absl::Status {
        if (selection_.pending) {
          secs.forward += Lap(t);
          RETURN_IF_ERROR(TakeSelection());
          secs.select += Lap(t);
        }
        cmaps_.clear();
        for (SeqState* st : states) {
          maps_.push_back(&st->map);
          cmaps_.push_back(&st->map);
        }
        RETURN_IF_ERROR(PlanElasticLoads(cmaps_, selection_.sets, &plan_));
        planned = true;
        sf.desc.slots = plan_.slots;
        if (tiers_->any_reload_pending()) FullReloadCopies(selection_.sets, plan_.slots, &full_);
        layer_copies_.assign(n_layers, nullptr);
        for (int32_t l = tiers_->gpu_layers(); l < n_layers; ++l) {
          layer_copies_[l] = tiers_->reload_pending(l) ? &full_ : &plan_.copies;
        }
        sf.layer_copies = std::move(layer_copies_);
        sf.counters = &stats_.elastic;
        stats_.elastic.AddPlan(plan_);
        secs.plan += Lap(t);
        return absl::OkStatus();
      };
      if (selection_.pending) {
        sf.before_offloaded = plan;
      } else {
        RETURN_IF_ERROR(plan());
      }
    }
  }
  ++decode_steps_;
  if (options_.recall_observer && !sf.dense_attention) {
    RETURN_IF_ERROR(StartRecallProbe(static_cast<int64_t>(fwd.size()), &sf));
  }
  ASSIGN_OR_RETURN(HiddenCapture * cap, PrepareCapture(static_cast<int64_t>(fwd.size())));
  // An error leaves a pending selection to be waited for by the next one.
  RETURN_IF_ERROR(SparseForwardInto(*model_, fwd, device, sf, cap, logits, &layer_copies_));
  secs.forward += Lap(t);
  if (selection_.pending) {
    RETURN_IF_ERROR(TakeSelection());  // complete by now: it came down while the forward ran
    secs.select += Lap(t);
  }
  if (planned) {
    RETURN_IF_ERROR(ApplyElasticPlan(plan_, selection_.sets, maps_));
    tiers_->ClearReloads();
  }
  // The step's sets become last_sets() by a swap (O(1)); the next selection refills the other buffer.
  if (options_.recall_observer) RETURN_IF_ERROR(FinishRecallProbe(fwd, states, sf));
  if (!sf.dense_attention) {
    std::swap(last_sets_, selection_.sets);
    last_set_ids_.clear();
    for (const SeqState* st : states) last_set_ids_.push_back(st->id);
  }
  ++(sf.dense_attention ? stats_.dense_steps : stats_.sparse_steps);
  if (cap != nullptr) RETURN_IF_ERROR(KeepLastHidden(fwd, states, *cap));
  secs.apply += Lap(t);
  secs.total += std::chrono::duration<double>(t - start).count();
  ++secs.steps;
  return absl::OkStatus();
}

absl::Status SparseDecoder::TakeSelection() {
  RETURN_IF_ERROR(model_->backend()->FinishSelectIndexSets(&selection_));
  // The sets address the rank's KV heads: head-level ones already do (selected from its heads' share); a
  // batch-level set, scored over every head, is shared by the KV heads of the rank's shard.
  if (model_->tensor_parallel().size > 1) {
    selection_.sets.n_kv_heads = static_cast<int32_t>(model_->config().num_key_value_heads);
  }
  double mass = 0;
  for (float m : selection_.captured_mass) mass += m;
  if (!selection_.captured_mass.empty()) stats_.last_captured_mass = mass / selection_.captured_mass.size();
  return absl::OkStatus();
}

absl::Status SparseDecoder::Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                                    Tensor* logits) {
  return Run(fwd, seqs, logits, /*device=*/false);
}

absl::StatusOr<Tensor> SparseDecoder::ForwardDevice(std::span<const ForwardSeq> fwd,
                                                    std::span<const SparseStepSeq> seqs) {
  Tensor logits;
  RETURN_IF_ERROR(Run(fwd, seqs, &logits, /*device=*/true));
  return logits;
}

absl::Status SparseDecoder::Run(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs, Tensor* logits,
                                bool device) {
  if (fwd.size() != seqs.size()) return absl::InvalidArgumentError("sparse forward: one SparseStepSeq per sequence");
  RETURN_IF_ERROR(PlanLayers(fwd, seqs));
  const int64_t vocab = model_->config().vocab_size;
  // Prompt chunks run dense; single decode tokens with a past run the sparse path. Two forwards keep each
  // attention kernel uniform.
  for (int pass = 0; pass < 2; ++pass) {
    // Scratch reused across steps (pass 0 is done with them before pass 1 refills them).
    std::vector<ForwardSeq>& part = pass_fwd_;
    std::vector<SeqState*>& states = pass_states_;
    std::vector<size_t>& rows = pass_rows_;
    part.clear();
    states.clear();
    rows.clear();
    for (size_t i = 0; i < fwd.size(); ++i) {
      if (IsDecodeRow(fwd[i]) != (pass == 1)) continue;
      auto it = seqs_.find(seqs[i].id);
      if (it == seqs_.end() || it->second->kv != fwd[i].kv) {
        return absl::FailedPreconditionError(absl::StrCat("sparse forward: sequence ", seqs[i].id,
                                                          " was not allocated by this decoder"));
      }
      part.push_back(fwd[i]);
      states.push_back(it->second.get());
      rows.push_back(i);
    }
    if (part.empty()) continue;
    // A pass holding every sequence writes the caller's logits directly (the usual decode step); otherwise its
    // rows go to their place (pass_outputs.h, shared with split mode's decoder).
    const int64_t n_part = static_cast<int64_t>(part.size()), n_all = static_cast<int64_t>(fwd.size());
    Tensor out = pass_logits_.Target(*logits, n_part, n_all, vocab, device);
    RETURN_IF_ERROR(pass == 0 ? Prefill(part, states, &out, device) : Decode(part, states, &out, device));
    RETURN_IF_ERROR(pass_logits_.Place(*model_->backend(), out, rows, n_all, device, logits));
    for (size_t j = 0; j < part.size(); ++j) {
      states[j]->len = part[j].past_len + static_cast<int32_t>(part[j].tokens.size());
    }
  }
  return absl::OkStatus();
}

SparseEngineStats SparseDecoder::stats() const {
  SparseEngineStats s = stats_;
  s.gpu_layers = tiers_->gpu_layers();
  s.offloaded_layers = tiers_->n_layers() - tiers_->gpu_layers();
  s.layer_moves = tiers_->counters().moves;
  s.layer_returns = tiers_->counters().returns;
  s.layer_move_seconds = tiers_->counters().seconds;
  s.host_kv_bytes = model_->backend()->host_memory_report().total;
  s.device_bytes = model_->backend()->memory_report().total;
  return s;
}

}  // namespace specontext
