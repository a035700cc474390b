#include "retriever/retriever_session.h"

#include <cstring>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext::retriever {

RetrieverSession::RetrieverSession(const RetrievalHead* head, SessionLimits limits, RetrieverTotals* totals,
                                   HeadRunner* runner)
    : head_(head), limits_(limits), totals_(totals), runner_(runner) {
  if (totals_ != nullptr) ++totals_->sessions;
}

RetrieverSession::~RetrieverSession() {
  for (auto& [id, s] : seqs_) {
    Free(s);
    if (totals_ == nullptr) continue;
    totals_->cache_bytes -= s.accounted_bytes;
    --totals_->sequences;
  }
  if (totals_ != nullptr) --totals_->sessions;
}

void RetrieverSession::Free(Sequence& s) {
  if (runner_ == nullptr) return;
  std::vector<Tensor> tensors;
  tensors.push_back(std::move(s.k));
  tensors.push_back(std::move(s.last_q));
  runner_->Release(std::move(tensors));
}

void RetrieverSession::Account(Sequence& s) {
  const int64_t cache = runner_ != nullptr ? (s.k.empty() ? 0 : static_cast<int64_t>(s.k.nbytes())) : s.cache->bytes();
  const int64_t now = cache + static_cast<int64_t>(s.last_q.nbytes());
  if (totals_ != nullptr) totals_->cache_bytes += now - s.accounted_bytes;
  s.accounted_bytes = now;
}

int64_t RetrieverSession::CacheBytes(int64_t rows) const {
  const int64_t element = runner_ != nullptr ? runner_->element_bytes() : static_cast<int64_t>(sizeof(float));
  return (head_->n_kv_heads() * rows + head_->n_heads()) * head_->head_dim() * element;
}

int64_t RetrieverSession::RowsFor(const Sequence& s, int64_t len) const {
  const int64_t now = runner_ != nullptr ? (s.k.empty() ? 0 : s.k.dim(1)) : (s.cache ? s.cache->k().dim(1) : 0);
  int64_t rows = now > 0 ? now : std::min<int64_t>(s.max_tokens, 256);
  while (rows < len) rows *= 2;
  return runner_ != nullptr ? std::min<int64_t>(rows, std::max<int64_t>(s.max_tokens, len)) : rows;
}

absl::Status RetrieverSession::Reserve(Sequence& s, int64_t bytes, const char* what, uint64_t id) {
  const int64_t delta = bytes - s.accounted_bytes;
  if (delta <= 0 || totals_ == nullptr) return absl::OkStatus();
  const int64_t limit = limits_.max_total_cache_bytes;
  int64_t total = totals_->cache_bytes.load();
  do {
    if (limit > 0 && total + delta > limit) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, ": sequence ", id, " needs ", delta, " more bytes of retrieval cache but the retriever holds ", total,
          " of its ", limit, "-byte limit (--max-cache-bytes) over all sessions; close sequences or retry later"));
    }
  } while (!totals_->cache_bytes.compare_exchange_weak(total, total + delta));
  s.accounted_bytes = bytes;
  return absl::OkStatus();
}

absl::Status RetrieverSession::Open(uint64_t id, int32_t max_tokens) {
  if (seqs_.contains(id)) return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " is already open"));
  if (open_sequences() >= limits_.max_sequences) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session already holds ", limits_.max_sequences, " sequences (the limit)"));
  }
  if (max_tokens < 1 || max_tokens > limits_.max_tokens_per_sequence) {
    return absl::InvalidArgumentError(absl::StrCat("open: max_tokens must be in [1, ", limits_.max_tokens_per_sequence,
                                                   "], got ", max_tokens));
  }
  Sequence s;
  s.max_tokens = max_tokens;
  const int64_t rows = RowsFor(s, 0);
  RETURN_IF_ERROR(Reserve(s, CacheBytes(rows), "open", id));
  if (runner_ != nullptr) {
    if (absl::Status st = runner_->Grow(&s.k, rows); !st.ok()) {
      if (totals_ != nullptr) totals_->cache_bytes -= s.accounted_bytes;
      return st;
    }
  } else {
    s.cache = std::make_unique<RetrievalKvCache>(head_->n_kv_heads(), head_->head_dim(), rows);
  }
  auto [it, inserted] = seqs_.emplace(id, std::move(s));
  Account(it->second);
  if (totals_ != nullptr) ++totals_->sequences;
  return absl::OkStatus();
}

absl::Status RetrieverSession::Observe(uint64_t id, const std::vector<int32_t>& ids, const std::vector<float>& fused) {
  const ObserveEntry entry{id, ids, fused};
  return ObserveBatch(std::span<const ObserveEntry>(&entry, 1));
}

absl::Status RetrieverSession::CheckObserve(const ObserveEntry& e, const Sequence& s) const {
  const uint64_t id = e.sequence_id;
  const int64_t n = static_cast<int64_t>(e.ids.size());
  if (n == 0 || n > limits_.max_tokens_per_observe) {
    return absl::InvalidArgumentError(absl::StrCat("observe: 1 to ", limits_.max_tokens_per_observe,
                                                   " token ids per message, got ", n));
  }
  const int32_t len = Len(s);
  if (len + n > s.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat("observe: sequence ", id, " would hold ", len + n,
                                                     " tokens; it was opened for ", s.max_tokens));
  }
  const int64_t vocab = head_->config().attn.vocab_size;
  for (int32_t t : e.ids) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("observe: token id ", t, " is outside the vocabulary [0, ",
                                                     vocab, ")"));
    }
  }
  const int64_t fw = head_->fused_width();
  if (fw > 0) {
    if (static_cast<int64_t>(e.fused.size()) != n * fw) {
      return absl::InvalidArgumentError(absl::StrCat("observe: hidden must hold ", n, " x ", fw, " floats, got ",
                                                     e.fused.size()));
    }
  } else if (!e.fused.empty()) {
    return absl::InvalidArgumentError("observe: this head takes no hidden states");
  }
  return absl::OkStatus();
}

absl::Status RetrieverSession::ObserveBatch(std::span<const ObserveEntry> batch, uint64_t* failed) {
  if (batch.empty()) return absl::InvalidArgumentError("observe batch: no observes");
  uint64_t unused = 0;
  if (failed == nullptr) failed = &unused;
  // Everything is checked before any work or accounting: ids, sizes and features of every entry.
  std::vector<Sequence*> seqs;
  seqs.reserve(batch.size());
  absl::flat_hash_set<uint64_t> seen;
  seen.reserve(batch.size());
  int64_t total = 0;
  for (const ObserveEntry& e : batch) {
    *failed = e.sequence_id;
    auto it = seqs_.find(e.sequence_id);
    if (it == seqs_.end()) {
      return absl::NotFoundError(absl::StrCat("observe: sequence ", e.sequence_id, " is not open"));
    }
    if (!seen.insert(e.sequence_id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("observe: sequence ", e.sequence_id, " is named more than once in one batch"));
    }
    RETURN_IF_ERROR(CheckObserve(e, it->second));
    total += static_cast<int64_t>(e.ids.size());
    seqs.push_back(&it->second);
  }
  if (total > limits_.max_tokens_per_observe) {
    *failed = batch.front().sequence_id;
    return absl::InvalidArgumentError(absl::StrCat("observe: 1 to ", limits_.max_tokens_per_observe,
                                                   " token ids per message, got ", total, " in ", batch.size(),
                                                   " observes"));
  }
  // Reserve the rows each cache will have after (it doubles when full), all or none, before any work.
  std::vector<int64_t> before(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence& s = *seqs[i];
    before[i] = s.accounted_bytes;
    *failed = batch[i].sequence_id;
    const int64_t rows = RowsFor(s, Len(s) + static_cast<int64_t>(batch[i].ids.size()));
    if (absl::Status st = Reserve(s, std::max(s.accounted_bytes, CacheBytes(rows)), "observe", batch[i].sequence_id);
        !st.ok()) {
      for (size_t j = 0; j < i; ++j) {
        if (totals_ != nullptr) totals_->cache_bytes -= seqs[j]->accounted_bytes - before[j];
        seqs[j]->accounted_bytes = before[j];
      }
      return st;
    }
  }
  *failed = 0;
  if (runner_ != nullptr) {
    absl::Status st;
    std::vector<HeadRunner::ObserveSeq> work;
    work.reserve(batch.size());
    for (size_t i = 0; i < batch.size() && st.ok(); ++i) {
      Sequence& s = *seqs[i];
      st = runner_->Grow(&s.k, RowsFor(s, s.len + static_cast<int64_t>(batch[i].ids.size())));
      work.push_back({batch[i].ids, batch[i].fused, &s.k, s.len, &s.last_q});
    }
    if (st.ok()) st = runner_->Observe(work);
    for (size_t i = 0; i < batch.size(); ++i) {
      if (st.ok()) seqs[i]->len += static_cast<int32_t>(batch[i].ids.size());
      Account(*seqs[i]);
    }
    return st;
  }
  const int64_t fw = head_->fused_width(), nh = head_->n_heads(), hd = head_->head_dim();
  for (size_t i = 0; i < batch.size(); ++i) {
    const ObserveEntry& e = batch[i];
    Sequence& s = *seqs[i];
    const int64_t n = static_cast<int64_t>(e.ids.size());
    Tensor fused_t;
    if (fw > 0) {
      fused_t = Tensor::HostEmpty(DType::kF32, {n, fw});
      std::memcpy(fused_t.as<float>(), e.fused.data(), e.fused.size() * sizeof(float));
    }
    Tensor q = Tensor::HostEmpty(DType::kF32, {n, nh, hd});
    RETURN_IF_ERROR(head_->Observe({e.ids.begin(), e.ids.end()}, fused_t, s.cache.get(), &q));
    if (s.last_q.data() == nullptr) s.last_q = Tensor::HostEmpty(DType::kF32, {nh, hd});
    std::memcpy(s.last_q.as<float>(), q.as<float>() + (n - 1) * nh * hd, nh * hd * sizeof(float));
    Account(s);
  }
  return absl::OkStatus();
}

absl::StatusOr<SelectionResult> RetrieverSession::Select(const std::vector<uint64_t>& ids, int32_t budget,
                                                         int32_t sink, SelectionMode mode) {
  if (ids.empty()) return absl::InvalidArgumentError("select: no sequence ids");
  if (budget < 1 || budget > limits_.max_budget) {
    return absl::InvalidArgumentError(absl::StrCat("select: budget must be in [1, ", limits_.max_budget, "], got ",
                                                   budget));
  }
  if (sink < 0 || sink > budget) {
    return absl::InvalidArgumentError(absl::StrCat("select: sink must be in [0, budget=", budget, "], got ", sink));
  }
  // Everything a Select costs is bounded before any scoring: each id at most once (every one must be
  // open, so at most max_sequences), and a reply that fits the message limit.
  absl::flat_hash_set<uint64_t> seen;
  seen.reserve(ids.size());
  int64_t reply_bytes = 0;
  const int64_t sets = mode == SelectionMode::kBatchLevel ? 1 : head_->n_kv_heads();
  for (uint64_t id : ids) {
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat("select: sequence ", id, " is named more than once"));
    }
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("select: sequence ", id, " is not open"));
    const int64_t past = std::max(0, Len(it->second) - 1);
    // indices (up to 4 bytes each once varint-coded below 2^28) + indptr, seq_len and mass per sequence.
    reply_bytes += sets * (std::min<int64_t>(budget, past) * 4 + 4) + 4 + head_->n_heads() * 4;
  }
  if (limits_.max_reply_bytes > 0 && reply_bytes > limits_.max_reply_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "select: the index sets of ", ids.size(), " sequences x ", sets, " sets at budget ", budget, " could take ",
        reply_bytes, " bytes, over the ", limits_.max_reply_bytes,
        "-byte message limit (--max-message-bytes); select fewer sequences or a smaller budget"));
  }
  std::vector<SelectionQuery> batch;
  batch.reserve(ids.size());
  for (uint64_t id : ids) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("select: sequence ", id, " is not open"));
    const Sequence& s = it->second;
    if (Len(s) == 0) {
      return absl::FailedPreconditionError(absl::StrCat("select: sequence ", id, " has observed no token"));
    }
    SelectionQuery q;
    q.q = s.last_q;
    q.k_cache = runner_ != nullptr ? s.k : s.cache->k();
    q.len = Len(s) - 1;  // the current token's past
    q.budget = budget;
    batch.push_back(std::move(q));
  }
  SelectionOptions options;
  options.budget = budget;
  options.sink = sink;
  options.mode = mode;
  if (runner_ != nullptr) return runner_->Select(batch, options);
  return SelectTopB(batch, options);
}

absl::Status RetrieverSession::Close(uint64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("close: sequence ", id, " is not open"));
  if (totals_ != nullptr) {
    totals_->cache_bytes -= it->second.accounted_bytes;
    --totals_->sequences;
  }
  Free(it->second);
  seqs_.erase(it);
  return absl::OkStatus();
}

}  // namespace specontext::retriever
