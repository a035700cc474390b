#include "core/sparse/retrieval_head_device.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// Uploads a host f32 vector as a backend tensor of `shape` in `dtype` (kRetrieval).
absl::StatusOr<Tensor> Upload(Backend& b, const std::vector<float>& v, Shape shape, DType dtype, int64_t* bytes) {
  Tensor host(const_cast<float*>(v.data()), DType::kF32, std::move(shape));
  ASSIGN_OR_RETURN(Tensor t, b.ToDevice(host, dtype, MemoryKind::kRetrieval));
  *bytes += static_cast<int64_t>(t.nbytes());
  return t;
}

// A view of a backend tensor's storage from element `offset_elems` with `shape` (no copy).
Tensor View(const Tensor& t, int64_t offset_elems, Shape shape) {
  return Tensor(static_cast<char*>(t.data()) + offset_elems * DTypeSize(t.dtype()), t.dtype(), std::move(shape),
                t.device(), t.storage());
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceRetrievalHead>> DeviceRetrievalHead::Create(const RetrievalHead& head,
                                                                                 Backend* backend,
                                                                                 const Tensor* shared_embedding) {
  if (backend == nullptr) return absl::InvalidArgumentError("retrieval head: no backend");
  std::unique_ptr<DeviceRetrievalHead> d(new DeviceRetrievalHead(head, backend));
  Backend& b = *backend;
  const ModelConfig& a = head.config().attn;
  const int64_t hidden = a.hidden_size, hd = a.head_dim, nq = a.num_attention_heads, nkv = a.num_key_value_heads;
  const DType ct = b.compute_dtype(), wt = b.weight_dtype(head.matrix_dtype_);
  int64_t& bytes = d->weight_bytes_;
  const DType et = b.weight_dtype(head.embed_.dtype());
  if (shared_embedding != nullptr) {
    if (shared_embedding->shape() != Shape{a.vocab_size, hidden} || shared_embedding->dtype() != et) {
      return absl::InvalidArgumentError(absl::StrCat("retrieval head: shared embedding ",
                                                     shared_embedding->DebugString(), " does not fit [", a.vocab_size, ", ", hidden, "] ",
                                                     std::string(DTypeName(et))));
    }
    d->embed_ = *shared_embedding;
  } else {
    ASSIGN_OR_RETURN(d->embed_, b.ToDevice(head.embed_, et, MemoryKind::kRetrieval));
    bytes += static_cast<int64_t>(d->embed_.nbytes());
  }
  ASSIGN_OR_RETURN(d->input_norm_, Upload(b, head.input_norm_, {hidden}, ct, &bytes));
  if (head.config().kind == RetrievalHeadKind::kEagle3) {
    const int64_t fw = head.fused_width();
    std::vector<float> fc(head.fc_);
    if (head.config().fused_norm != FusedNorm::kNone) {
      // fc(RMSNorm(h) ⊙ w) = (fc with column j scaled by w[j])(RMSNorm(h)): the norm weights fold into fc, and
      // the forward normalises with unit weights (one RmsNorm over [n·groups, fw / groups] rows, no new op).
      for (int64_t r = 0; r < hidden; ++r) {
        for (int64_t j = 0; j < fw; ++j) fc[r * fw + j] *= head.fc_norm_[j];
      }
      d->fused_groups_ = head.config().fused_norm == FusedNorm::kPerLayer ? 3 : 1;
      const std::vector<float> ones(fw / d->fused_groups_, 1.0f);
      ASSIGN_OR_RETURN(d->fused_norm_unit_, Upload(b, ones, {fw / d->fused_groups_}, ct, &bytes));
    }
    ASSIGN_OR_RETURN(d->fc_, Upload(b, fc, {hidden, fw}, wt, &bytes));
    if (!head.fc_bias_.empty()) {
      ASSIGN_OR_RETURN(d->fc_bias_, Upload(b, head.fc_bias_, {hidden}, ct, &bytes));
    }
    ASSIGN_OR_RETURN(d->hidden_norm_, Upload(b, head.hidden_norm_, {hidden}, ct, &bytes));
  }
  // Q and K projections stacked by rows: one GEMM reads the input once.
  std::vector<float> w(head.wq_);
  w.insert(w.end(), head.wk_.begin(), head.wk_.end());
  ASSIGN_OR_RETURN(d->w_qk_, Upload(b, w, {(nq + nkv) * hd, head.config().proj_in()}, wt, &bytes));
  if (!head.bq_.empty()) {
    std::vector<float> bias(head.bq_);
    bias.insert(bias.end(), head.bk_.begin(), head.bk_.end());
    ASSIGN_OR_RETURN(d->b_qk_, Upload(b, bias, {(nq + nkv) * hd}, ct, &bytes));
  }
  if (!head.q_norm_.empty()) {
    ASSIGN_OR_RETURN(d->q_norm_, Upload(b, head.q_norm_, {hd}, ct, &bytes));
    ASSIGN_OR_RETURN(d->k_norm_, Upload(b, head.k_norm_, {hd}, ct, &bytes));
  }
  ASSIGN_OR_RETURN(d->inv_freq_, Upload(b, head.inv_freq_, {hd / 2}, DType::kF32, &bytes));
  d->rope_.inv_freq = &d->inv_freq_;
  d->rope_.interleaved = a.rope_interleaved;
  d->rope_.attention_scaling = head.attention_scaling_;
  return d;
}

int64_t DeviceRetrievalHead::cache_bytes_per_token() const {
  return n_kv_heads() * head_dim() * static_cast<int64_t>(DTypeSize(backend_->compute_dtype()));
}

absl::StatusOr<Tensor> DeviceRetrievalHead::AllocateCache(int32_t capacity) const {
  if (capacity <= 0) return absl::InvalidArgumentError("retrieval cache capacity must be positive");
  return backend_->Alloc(backend_->compute_dtype(), {n_kv_heads(), capacity, head_dim()}, MemoryKind::kRetrieval);
}

absl::Status DeviceRetrievalHead::Forward(const Tensor& ids, const Tensor& positions, const Tensor* fused, Tensor* q,
                                          Tensor* k) {
  Backend& b = *backend_;
  const ModelConfig& a = head_.config().attn;
  const DType ct = b.compute_dtype();
  const int64_t n = ids.numel(), hidden = a.hidden_size, in = head_.config().proj_in(), hd = a.head_dim;
  const int64_t nq = a.num_attention_heads, nkv = a.num_key_value_heads;
  const float eps = static_cast<float>(a.rms_norm_eps);
  if (ids.dtype() != DType::kI32 || positions.dtype() != DType::kI32 || positions.numel() != n) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: ids ", ids.DebugString(), " and positions ",
                                                   positions.DebugString(), " must be i32 [n]"));
  }
  if (q == nullptr || k == nullptr || q->dtype() != ct || k->dtype() != ct || q->shape() != Shape{n, nq, hd} ||
      k->shape() != Shape{n, nkv, hd}) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: q/k outputs must be ", std::string(DTypeName(ct)),
                                                   " [", n, ", ", nq, "|", nkv, ", ", hd, "]"));
  }
  const bool eagle3 = head_.config().kind == RetrievalHeadKind::kEagle3;
  if (eagle3 && (fused == nullptr || fused->dtype() != ct || fused->shape() != Shape{n, fused_width()})) {
    return absl::InvalidArgumentError(absl::StrCat("retrieval head: eagle3 needs fused hidden states ",
                                                   std::string(DTypeName(ct)), " [", n, ", ", fused_width(), "], got ",
                                                   fused == nullptr ? "none" : fused->DebugString()));
  }
  if (n == 0) return absl::OkStatus();
  // x [n, in]: the normalised embedding (eagle3: then the normalised fc of the fused features).
  ASSIGN_OR_RETURN(Tensor e, b.Alloc(ct, {n, hidden}, MemoryKind::kWorkspace));
  const Tensor* fc_in = fused;
  const Tensor* fc_bias = fc_bias_.empty() ? nullptr : &fc_bias_;
  Tensor normed;
  if (eagle3 && fused_groups_ > 0) {  // fused features RMS-normalised per third / whole (weights folded into fc_)
    const int64_t fw = fused_width(), w = fw / fused_groups_;
    ASSIGN_OR_RETURN(normed, b.Alloc(ct, {n, fw}, MemoryKind::kWorkspace));
    Tensor rows_out = View(normed, 0, {n * fused_groups_, w});
    RETURN_IF_ERROR(b.RmsNorm(View(*fused, 0, {n * fused_groups_, w}), fused_norm_unit_, eps, &rows_out));
    fc_in = &normed;
  }
  RETURN_IF_ERROR(b.Embedding(embed_, ids, &e));
  ASSIGN_OR_RETURN(Tensor x, b.Alloc(ct, {n, in}, MemoryKind::kWorkspace));
  if (!eagle3) {
    RETURN_IF_ERROR(b.RmsNorm(e, input_norm_, eps, &x));
  } else if (n == 1) {
    // One row: its two column blocks are contiguous, so the norms write them in place (two copies fewer in a
    // decode step).
    Tensor lo = View(x, 0, {1, hidden}), hi = View(x, hidden, {1, hidden});
    RETURN_IF_ERROR(b.RmsNorm(e, input_norm_, eps, &lo));
    RETURN_IF_ERROR(b.Linear(*fc_in, fc_, fc_bias, &e));
    RETURN_IF_ERROR(b.RmsNorm(e, hidden_norm_, eps, &hi));
  } else {
    ASSIGN_OR_RETURN(Tensor part, b.Alloc(ct, {n, hidden}, MemoryKind::kWorkspace));
    RETURN_IF_ERROR(b.RmsNorm(e, input_norm_, eps, &part));
    RETURN_IF_ERROR(b.CopyToColumns(part, 0, &x));
    RETURN_IF_ERROR(b.Linear(*fc_in, fc_, fc_bias, &e));
    RETURN_IF_ERROR(b.RmsNorm(e, hidden_norm_, eps, &part));
    RETURN_IF_ERROR(b.CopyToColumns(part, hidden, &x));
  }
  const Tensor* bias = b_qk_.empty() ? nullptr : &b_qk_;
  if (n == 1 && q_norm_.empty() && static_cast<char*>(q->data()) + q->nbytes() == k->data() &&
      q->storage() == k->storage()) {
    // One row with k right after q in one buffer (SparseDecoder's decode buffers): the projection writes
    // both and one rotation turns them, no copies.
    Tensor qk = View(*q, 0, {1, (nq + nkv) * hd});
    RETURN_IF_ERROR(b.Linear(x, w_qk_, bias, &qk));
    Tensor qk3 = View(*q, 0, {1, nq + nkv, hd});
    return b.Rope(&qk3, positions, rope_);
  }
  ASSIGN_OR_RETURN(Tensor qk, b.Alloc(ct, {n, (nq + nkv) * hd}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(b.Linear(x, w_qk_, bias, &qk));
  Tensor q2 = View(*q, 0, {n, nq * hd}), k2 = View(*k, 0, {n, nkv * hd});
  if (q_norm_.empty()) {
    // q and k share the positions: one rotation over all heads, then split.
    Tensor qk3 = View(qk, 0, {n, nq + nkv, hd});
    RETURN_IF_ERROR(b.Rope(&qk3, positions, rope_));
    RETURN_IF_ERROR(b.CopyColumns(qk, 0, &q2));
    RETURN_IF_ERROR(b.CopyColumns(qk, nq * hd, &k2));
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(b.CopyColumns(qk, 0, &q2));
  RETURN_IF_ERROR(b.CopyColumns(qk, nq * hd, &k2));
  Tensor qr = View(*q, 0, {n * nq, hd}), kr = View(*k, 0, {n * nkv, hd});
  RETURN_IF_ERROR(b.RmsNorm(qr, q_norm_, eps, &qr));
  RETURN_IF_ERROR(b.RmsNorm(kr, k_norm_, eps, &kr));
  RETURN_IF_ERROR(b.Rope(q, positions, rope_));
  return b.Rope(k, positions, rope_);
}

int64_t DeviceRetrievalHead::ObserveWorkspaceBytes(int64_t n) const {
  const ModelConfig& a = head_.config().attn;
  const int64_t es = static_cast<int64_t>(DTypeSize(backend_->compute_dtype()));
  const int64_t hidden = a.hidden_size, in = head_.config().proj_in(), hd = a.head_dim;
  const int64_t nq = a.num_attention_heads, nkv = a.num_key_value_heads;
  auto t = [](int64_t bytes) { return AllocationBoundBytes(bytes); };
  const bool eagle3 = head_.config().kind == RetrievalHeadKind::kEagle3;
  int64_t forward = t(n * hidden * es) + t(n * in * es) + t(n * (nq + nkv) * hd * es);
  if (eagle3) forward += t(n * fused_width() * es) + t(n * hidden * es);  // normed, part
  return t(2 * n * 4) + t(n * nkv * hd * es) + forward;
}

absl::Status DeviceRetrievalHead::Observe(std::span<const int32_t> ids, std::span<const Seq> seqs,
                                          const Tensor* fused, Tensor* q) {
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(ids.size());
  staging_.assign(ids.begin(), ids.end());
  staging_.resize(2 * n);
  segments_.clear();
  int32_t row = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const Seq& sq = seqs[s];
    if (sq.cache == nullptr || sq.n_tokens < 0 || sq.pos < 0 || row + sq.n_tokens > n) {
      return absl::InvalidArgumentError(absl::StrCat("retrieval head: observe sequence ", s, " (", sq.n_tokens,
                                                     " tokens at ", sq.pos, ") does not fit ", n, " ids"));
    }
    for (int32_t i = 0; i < sq.n_tokens; ++i) staging_[n + row + i] = sq.pos + i;
    segments_.push_back({sq.cache, row, sq.n_tokens, sq.pos});
    row += sq.n_tokens;
  }
  if (row != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("retrieval head: ", n, " ids but the sequences hold ", row, " tokens"));
  }
  if (n == 0) return absl::OkStatus();
  const int64_t vocab = head_.config().attn.vocab_size;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab) {
      return absl::OutOfRangeError(absl::StrCat("retrieval head: token ", id, " outside the vocabulary of ", vocab));
    }
  }
  ASSIGN_OR_RETURN(Tensor dev, b.Alloc(DType::kI32, {2 * n}, MemoryKind::kWorkspace));
  Tensor host(staging_.data(), DType::kI32, {2 * n});
  RETURN_IF_ERROR(b.CopyToDevice(host, &dev));
  ASSIGN_OR_RETURN(Tensor k, b.Alloc(b.compute_dtype(), {n, n_kv_heads(), head_dim()}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(Forward(View(dev, 0, {n}), View(dev, n, {n}), fused, q, &k));
  return b.ScatterRows(k, segments_);
}

}  // namespace specontext
