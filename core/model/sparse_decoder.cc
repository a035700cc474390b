#include "core/model/sparse_decoder.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/elastic.h"
#include "core/status_macros.h"

namespace specontext {

struct SparseDecoder::SeqState {
  SeqState(int64_t n_kv, int64_t hd, int32_t cap, int32_t n_sets, int32_t b)
      : cache(n_kv, hd, std::min<int64_t>(cap, 256)), map(n_sets, b), budget(b) {}
  SequenceKv* kv = nullptr;
  RetrievalKvCache cache;
  SlotMap map;
  int32_t budget;
  int32_t len = 0;                 // tokens whose KV exists
  std::vector<float> last_hidden;  // eagle3: fused features of the last processed position
};

SparseDecoder::SparseDecoder(Transformer* model, const RetrievalHead* head, const SparseOptions& options)
    : model_(model), head_(head), options_(options) {}

SparseDecoder::~SparseDecoder() = default;

absl::StatusOr<std::optional<MemoryPlanner>> MakeMeasuredPlanner(const Transformer& model, int32_t budget,
                                                                 int64_t gpu_memory_limit) {
  const ModelConfig& c = model.config();
  Backend& b = *model.backend();
  const MemoryReport rep = b.memory_report();
  const int64_t limit = gpu_memory_limit > 0 ? gpu_memory_limit : rep.limit;
  if (limit <= 0) return std::nullopt;  // no device limit: every layer stays resident
  MemoryPlannerConfig pc;
  pc.mode = MemoryModelMode::kMeasured;
  pc.n_layers = static_cast<int32_t>(c.num_hidden_layers);
  pc.n_kv_heads = static_cast<int32_t>(c.num_key_value_heads);
  pc.head_dim = static_cast<int32_t>(c.head_dim);
  pc.alpha = static_cast<int32_t>(c.num_attention_heads / c.num_key_value_heads);
  pc.kv_elem_bytes = static_cast<int32_t>(DTypeSize(b.compute_dtype()));
  pc.budget = budget;
  pc.max_context = c.max_position_embeddings;
  pc.gpu_memory_bytes = limit;
  pc.measured.weights = rep.bytes[static_cast<size_t>(MemoryKind::kWeights)];
  pc.measured.graph_pools = rep.bytes[static_cast<size_t>(MemoryKind::kGraphs)];
  pc.measured.other = rep.total - pc.measured.weights - pc.measured.graph_pools;
  // Activations of one step are transient: bound them by a 512-token step (the engine's default chunk)
  // plus f32 logits of a 32-sequence batch.
  pc.measured.workspace =
      512 * (4 * c.hidden_size + 2 * c.intermediate_size + c.q_dim() + 2 * c.kv_dim()) * pc.kv_elem_bytes +
      32 * c.vocab_size * 4;
  auto planner = MemoryPlanner::Create(pc);
  if (!planner.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("memory planner (device limit ", limit,
                                                   " bytes): ", planner.status().message()));
  }
  return std::optional<MemoryPlanner>(*std::move(planner));
}

absl::StatusOr<std::unique_ptr<SparseDecoder>> SparseDecoder::Create(Transformer* model, const RetrievalHead* head,
                                                                     const SparseOptions& options) {
  if (model == nullptr || head == nullptr) return absl::InvalidArgumentError("sparse decoding needs a model and a retrieval head");
  const ModelConfig& c = model->config();
  RETURN_IF_ERROR(ValidateHeadForTarget(head->config(), c));
  if (head->n_kv_heads() != c.num_key_value_heads) {
    return absl::FailedPreconditionError(absl::StrCat("retrieval head has ", head->n_kv_heads(),
                                                      " KV heads but the model has ", c.num_key_value_heads));
  }
  {
    absl::Status st = ValidateBudget(options.budget, options.sink, c.max_position_embeddings);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("--budget/--sink: ", st.message()));
  }
  std::unique_ptr<SparseDecoder> d(new SparseDecoder(model, head, options));
  d->gpu_layers_ = static_cast<int32_t>(c.num_hidden_layers);
  d->reload_pending_.assign(c.num_hidden_layers, false);
  ASSIGN_OR_RETURN(d->planner_, MakeMeasuredPlanner(*model, options.budget, options.gpu_memory_limit));
  return d;
}

absl::StatusOr<std::unique_ptr<SequenceKv>> SparseDecoder::AllocateKv(uint64_t id, int32_t capacity, int32_t budget) {
  budget = std::max(1, std::min(budget, capacity));
  const ModelConfig& c = model_->config();
  ASSIGN_OR_RETURN(std::unique_ptr<SequenceKv> kv,
                   AllocateTieredKv(*model_->backend(), c, capacity, gpu_layers_, budget));
  const int32_t n_sets = options_.mode == SelectionMode::kHeadLevel ? static_cast<int32_t>(c.num_key_value_heads) : 1;
  auto st = std::make_unique<SeqState>(head_->n_kv_heads(), head_->head_dim(), capacity, n_sets, budget);
  st->kv = kv.get();
  st->last_hidden.assign(head_->fused_width(), 0.0f);  // position 0 pairs with zeros (EAGLE-3)
  seqs_[id] = std::move(st);
  return kv;
}

void SparseDecoder::Release(uint64_t id) { seqs_.erase(id); }

const RetrievalKvCache* SparseDecoder::retrieval_cache(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second->cache;
}

const SlotMap* SparseDecoder::slot_map(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second->map;
}

absl::Status SparseDecoder::OffloadLayers(int32_t gpu_layers) {
  const int32_t n_layers = static_cast<int32_t>(model_->config().num_hidden_layers);
  if (gpu_layers < 0 || gpu_layers > n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("gpu layers ", gpu_layers, " outside [0, ", n_layers, "]"));
  }
  // From the last layer backward, so the resident first layers hide the later layers' loads.
  for (int32_t l = gpu_layers_ - 1; l >= gpu_layers; --l) {
    for (auto& [id, st] : seqs_) RETURN_IF_ERROR(MoveLayerToHost(*model_->backend(), st->kv, l, st->budget));
    reload_pending_[l] = true;
    gpu_layers_ = l;
    ++stats_.layer_moves;
    SPC_LOG(INFO) << "layer moved to host" << Kv("layer", l) << Kv("sequences", seqs_.size());
  }
  return absl::OkStatus();
}

absl::Status SparseDecoder::PlanLayers(std::span<const ForwardSeq> fwd) {
  if (!planner_.has_value() || seqs_.empty()) return absl::OkStatus();
  int64_t total = 0;
  for (const auto& [id, st] : seqs_) total += st->len;
  for (const ForwardSeq& f : fwd) total += static_cast<int64_t>(f.tokens.size());
  ASSIGN_OR_RETURN(LayerMovePlan plan,
                   planner_->PlanMoves(gpu_layers_, total, static_cast<int32_t>(seqs_.size())));
  if (plan.gpu_layers_after < gpu_layers_) RETURN_IF_ERROR(OffloadLayers(plan.gpu_layers_after));
  return absl::OkStatus();
}

absl::Status SparseDecoder::ObserveTokens(SeqState& st, std::span<const int32_t> tokens, const HiddenCapture* capture,
                                          int64_t first_row, Tensor* q_last) {
  const int64_t n = static_cast<int64_t>(tokens.size()), fw = head_->fused_width();
  Tensor fused;
  if (fw > 0) {
    // EAGLE-3 pairs token t with the target's features of position t-1.
    fused = Tensor::HostEmpty(DType::kF32, {n, fw});
    std::memcpy(fused.as<float>(), st.last_hidden.data(), fw * sizeof(float));
    for (int64_t j = 1; j < n; ++j) {
      std::memcpy(fused.as<float>() + j * fw, capture->out.as<float>() + (first_row + j - 1) * fw, fw * sizeof(float));
    }
  }
  Tensor q = Tensor::HostEmpty(DType::kF32, {n, head_->n_heads(), head_->head_dim()});
  RETURN_IF_ERROR(head_->Observe(std::vector<int32_t>(tokens.begin(), tokens.end()), fused, &st.cache, &q));
  if (q_last != nullptr) {
    *q_last = Tensor::HostEmpty(DType::kF32, {head_->n_heads(), head_->head_dim()});
    std::memcpy(q_last->data(), q.as<float>() + (n - 1) * q_last->numel(), q_last->nbytes());
  }
  return absl::OkStatus();
}

absl::Status SparseDecoder::Prefill(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                    Tensor* logits) {
  HiddenCapture capture;
  for (int64_t l : head_->config().fusion_layers) capture.layers.push_back(static_cast<int32_t>(l));
  HiddenCapture* cap = head_->fused_width() > 0 ? &capture : nullptr;
  RETURN_IF_ERROR(model_->Forward(fwd, /*all_tokens=*/false, logits, nullptr, cap));
  int64_t row = 0;
  for (size_t i = 0; i < fwd.size(); ++i) {
    SeqState& st = *states[i];
    RETURN_IF_ERROR(ObserveTokens(st, fwd[i].tokens, cap, row, nullptr));
    row += static_cast<int64_t>(fwd[i].tokens.size());
    if (cap != nullptr) {
      const int64_t fw = head_->fused_width();
      std::memcpy(st.last_hidden.data(), capture.out.as<float>() + (row - 1) * fw, fw * sizeof(float));
    }
  }
  return absl::OkStatus();
}

absl::Status SparseDecoder::Decode(std::span<const ForwardSeq> fwd, std::span<SeqState* const> states,
                                   Tensor* logits) {
  const int32_t n_layers = static_cast<int32_t>(model_->config().num_hidden_layers);
  const bool offloaded = gpu_layers_ < n_layers;
  bool all_small = true;
  std::vector<SelectionQuery> queries(fwd.size());
  for (size_t i = 0; i < fwd.size(); ++i) {
    SeqState& st = *states[i];
    if (st.cache.len() != fwd[i].past_len) {
      return absl::InternalError(absl::StrCat("retrieval cache holds ", st.cache.len(), " tokens, sequence has ",
                                              fwd[i].past_len));
    }
    RETURN_IF_ERROR(ObserveTokens(st, fwd[i].tokens, nullptr, 0, &queries[i].q));
    queries[i].k_cache = st.cache.k();
    queries[i].len = fwd[i].past_len;
    queries[i].budget = st.budget;
    all_small = all_small && fwd[i].past_len <= st.budget;
  }
  SparseForward sf;
  sf.dense_attention = all_small && !offloaded;
  SelectionOptions so;
  so.budget = options_.budget;
  so.sink = options_.sink;
  so.mode = options_.mode;
  std::optional<ElasticPlan> plan;
  CopyList full;
  std::vector<SlotMap*> maps;
  if (!sf.dense_attention) {
    RETURN_IF_ERROR(SelectTopB(queries, so, &selection_));
    const IndexSets& sets = selection_.sets;
    sf.desc.sets = &sets;
    if (offloaded) {
      for (SeqState* st : states) maps.push_back(&st->map);
      std::vector<const SlotMap*> cmaps(maps.begin(), maps.end());
      ASSIGN_OR_RETURN(plan, PlanElasticLoads(cmaps, sets));
      sf.desc.slots = plan->slots;
      if (std::find(reload_pending_.begin(), reload_pending_.end(), true) != reload_pending_.end()) {
        full = FullReloadCopies(sets, plan->slots);
      }
      sf.layer_copies.assign(n_layers, nullptr);
      for (int32_t l = gpu_layers_; l < n_layers; ++l) sf.layer_copies[l] = reload_pending_[l] ? &full : &plan->copies;
      sf.counters = &stats_.elastic;
      stats_.elastic.AddPlan(*plan);
    }
    double mass = 0;
    for (float m : selection_.captured_mass) mass += m;
    if (!selection_.captured_mass.empty()) stats_.last_captured_mass = mass / selection_.captured_mass.size();
  }
  HiddenCapture capture;
  for (int64_t l : head_->config().fusion_layers) capture.layers.push_back(static_cast<int32_t>(l));
  HiddenCapture* cap = head_->fused_width() > 0 ? &capture : nullptr;
  RETURN_IF_ERROR(model_->Forward(fwd, /*all_tokens=*/false, logits, &sf, cap));
  if (plan.has_value()) {
    RETURN_IF_ERROR(ApplyElasticPlan(*plan, selection_.sets, maps));
    std::fill(reload_pending_.begin(), reload_pending_.end(), false);
  }
  if (!sf.dense_attention) last_sets_ = selection_.sets;
  ++(sf.dense_attention ? stats_.dense_steps : stats_.sparse_steps);
  if (cap != nullptr) {
    const int64_t fw = head_->fused_width();
    for (size_t i = 0; i < fwd.size(); ++i) {
      std::memcpy(states[i]->last_hidden.data(), capture.out.as<float>() + i * fw, fw * sizeof(float));
    }
  }
  return absl::OkStatus();
}

absl::Status SparseDecoder::Forward(std::span<const ForwardSeq> fwd, std::span<const SparseStepSeq> seqs,
                                    Tensor* logits) {
  if (fwd.size() != seqs.size()) return absl::InvalidArgumentError("sparse forward: one SparseStepSeq per sequence");
  RETURN_IF_ERROR(PlanLayers(fwd));
  const int64_t vocab = model_->config().vocab_size;
  // Prompt chunks run dense; single decode tokens with a past run the sparse path. Two forwards keep each
  // attention kernel uniform.
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<ForwardSeq> part;
    std::vector<SeqState*> states;
    std::vector<size_t> rows;
    for (size_t i = 0; i < fwd.size(); ++i) {
      const bool decode = fwd[i].tokens.size() == 1 && fwd[i].past_len > 0;
      if (decode != (pass == 1)) continue;
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
    Tensor out = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(part.size()), vocab});
    RETURN_IF_ERROR(pass == 0 ? Prefill(part, states, &out) : Decode(part, states, &out));
    for (size_t j = 0; j < part.size(); ++j) {
      std::memcpy(logits->as<float>() + rows[j] * vocab, out.as<float>() + j * vocab, vocab * sizeof(float));
      states[j]->len = part[j].past_len + static_cast<int32_t>(part[j].tokens.size());
    }
  }
  return absl::OkStatus();
}

SparseEngineStats SparseDecoder::stats() const {
  SparseEngineStats s = stats_;
  s.gpu_layers = gpu_layers_;
  s.offloaded_layers = static_cast<int32_t>(model_->config().num_hidden_layers) - gpu_layers_;
  s.host_kv_bytes = model_->backend()->host_memory_report().total;
  s.device_bytes = model_->backend()->memory_report().total;
  return s;
}

}  // namespace specontext
