// CudaBackend: ragged-batch metadata (PrepareBatch), KV append and attention dispatch.
//
// PrepareBatch validates the batch on the host and uploads, in one copy, the per-(layer, sequence)
// metadata (a layer's row count may differ: resident device KV grows in chunks while host copies hold the
// whole capacity), the token-row -> sequence map and the K/V pointers of every layer. A decode-only batch
// (every sequence one new token) needs nothing more: its split-K plan is derived on the device from
// each length, on a grid fixed by the batch size (DecodeSplitPlan), so Attention uploads nothing and a
// CUDA graph of the step stays valid as the sequences grow. Other batches: the first Attention call
// builds the work lists (prefill tiles; decode splits sized to fill the GPU) for the model's head
// count and uploads them in a second copy; later layers reuse both. In the batch-invariant mode the
// decoding rows of every batch take the device plan with a fixed split limit (kBatchInvariantDecodeSplits),
// so their splits and merge depend on their own length only, and the lists hold the prefill tiles alone.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

size_t Align16(size_t v) { return (v + 15) / 16 * 16; }

// PrepareBatch's metadata upload (meta_): [AttnSeq L x S][row_seq i32 x T][k ptrs L x S][v ptrs L x S].
struct BatchMetaLayout {
  size_t off_row_seq = 0, off_k_ptrs = 0, off_v_ptrs = 0, total = 0;
};
BatchMetaLayout BatchMetaLayoutOf(size_t n_layers, size_t n_seqs, size_t n_tokens) {
  BatchMetaLayout l;
  l.off_row_seq = Align16(sizeof(AttnSeq) * n_layers * n_seqs);
  l.off_k_ptrs = l.off_row_seq + Align16(sizeof(int32_t) * n_tokens);
  l.off_v_ptrs = l.off_k_ptrs + sizeof(void*) * n_layers * n_seqs;
  l.total = l.off_v_ptrs + sizeof(void*) * n_layers * n_seqs;
  return l;
}

// PlanAttention's work lists (plan_): [prefill items][decode items][combine items].
size_t PlanBytes(size_t n_prefill, size_t n_decode, size_t n_combine) {
  return sizeof(AttnWorkItem) * (n_prefill + n_decode) + sizeof(AttnCombineItem) * n_combine;
}

// The split-K partials (partials_) of `slots` split slots, either plan: O [slots, n_kv, kDecodeBlockM, head_dim]
// f32, then LSE [slots, n_kv, kDecodeBlockM] f32 at DecodePartialsLseOffset.
size_t DecodePartialsLseOffset(size_t slots, int n_kv, int head_dim) {
  return slots * n_kv * kDecodeBlockM * head_dim * sizeof(float);
}
size_t DecodePartialsBytes(size_t slots, int n_kv, int head_dim) {
  return DecodePartialsLseOffset(slots, n_kv, head_dim) + slots * n_kv * kDecodeBlockM * sizeof(float);
}

// Split slots of the host-built plan (PlanAttention) for `n_decode` decoding sequences of a mixed batch:
// each takes ceil(len / chunk) <= len / chunk + 1 slots and chunk >= decode_keys * n_kv / (2 * sm_count), so
// all of them fewer than 2 * sm_count / n_kv + n_decode.
size_t PlannedDecodeSlotsBound(int n_decode, int n_kv, int sm_count) {
  return size_t(2 * sm_count / n_kv + 1) + size_t(n_decode);
}

}  // namespace

absl::Status CudaBackend::EnsureBuffer(Tensor* buf, size_t bytes) {
  return EnsureDeviceBuffer(*memory_, buf, bytes, MemoryKind::kWorkspace);
}

absl::Status CudaBackend::Upload(PinnedStaging& staging, const void* src, size_t bytes, void* dst) {
  if (capturing_) return absl::FailedPreconditionError("an upload cannot be recorded in a CUDA graph");
  return StagedUpload(staging, src, bytes, dst, stream_);
}

absl::Status CudaBackend::PrepareBatch(const BatchDesc& batch) {
  batch_valid_ = false;
  planned_heads_ = 0;
  ++batch_serial_;  // invalidates the prefill staging plan (cuda_prefill_staging.cc)
  if (batch.seqs.size() != batch.kv.size()) return absl::InvalidArgumentError("batch: one SequenceKv per slice is required");
  const int n_seqs = static_cast<int>(batch.seqs.size());
  if (n_seqs == 0) return absl::InvalidArgumentError("batch: no sequences");
  int64_t sum = 0;
  for (const SeqSlice& s : batch.seqs) sum += s.n_tokens;
  if (sum != batch.n_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("batch: n_tokens ", batch.n_tokens, " differs from the slices' sum ", sum));
  }
  const SequenceKv* first = batch.kv[0];
  if (first == nullptr || first->k.empty() || first->k.size() != first->v.size()) {
    return absl::InvalidArgumentError("batch: sequence 0 has no KV layers");
  }
  const int n_layers = static_cast<int>(first->k.size());
  const KvRowsView first_rows = KvRowsOf(first->k[0], first->v[0]);
  const int64_t n_kv = first_rows.heads, hd = first_rows.head_dim;
  std::vector<int32_t> row_seq(batch.n_tokens, -1);
  std::vector<AttnSeq> seqs(size_t(n_layers) * n_seqs);  // [layer][sequence]
  std::vector<const void*> k_ptrs(size_t(n_layers) * n_seqs), v_ptrs(size_t(n_layers) * n_seqs);
  for (int i = 0; i < n_seqs; ++i) {
    const SeqSlice& s = batch.seqs[i];
    const SequenceKv* kv = batch.kv[i];
    if (kv == nullptr || static_cast<int>(kv->k.size()) != n_layers || kv->v.size() != kv->k.size()) {
      return absl::InvalidArgumentError(absl::StrCat("batch: sequence ", i, " does not have ", n_layers, " KV layers"));
    }
    if (s.n_tokens < 0 || s.past_len < 0 || s.token_begin < 0 || s.token_begin + s.n_tokens > batch.n_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("batch: slice ", i, " is out of range"));
    }
    if (s.past_len + s.n_tokens > kv->capacity) {
      return absl::OutOfRangeError(absl::StrCat("batch: sequence ", i, " needs ", s.past_len + s.n_tokens,
                                                " KV slots but has capacity ", kv->capacity));
    }
    const int64_t need = int64_t{s.past_len} + s.n_tokens;
    for (int l = 0; l < n_layers; ++l) {
      // Plain K and V [n_kv, rows, hd], or an interleaved host pair (the same [n_kv, rows, 2, hd] tensor).
      const KvRowsView r = KvRowsOf(kv->k[l], kv->v[l]);
      const bool pair = IsKvPair(kv->k[l]);
      for (const Tensor* t : {&kv->k[l], &kv->v[l]}) {
        const bool shape_ok = pair ? t->data() == kv->k[l].data() && t->shape() == kv->k[l].shape()
                                   : t->ndim() == 3 && t->dim(0) == r.heads && t->dim(1) == r.rows &&
                                         t->dim(2) == r.head_dim;
        if (t->dtype() != DType::kBF16 || t->device() != DeviceKind::kCuda || !shape_ok || r.heads != n_kv ||
            r.rows < need || r.rows > kv->capacity || r.head_dim != hd) {
          return absl::InvalidArgumentError(absl::StrCat("batch: sequence ", i, " layer ", l, " cache ",
                                                         t->DebugString(), ", expected bf16@cuda [", n_kv, ", ",
                                                         need, "..", kv->capacity, ", ", hd,
                                                         "] (K and V alike) or one [.., 2, ..] pair"));
        }
      }
      k_ptrs[size_t(l) * n_seqs + i] = r.k;
      v_ptrs[size_t(l) * n_seqs + i] = r.v;
      seqs[size_t(l) * n_seqs + i] = AttnSeq{s.token_begin, s.n_tokens, s.past_len, static_cast<int32_t>(r.rows),
                                             static_cast<int32_t>(r.stride)};
    }
    for (int32_t t = 0; t < s.n_tokens; ++t) {
      if (row_seq[s.token_begin + t] != -1) {
        return absl::InvalidArgumentError(absl::StrCat("batch: slices ", row_seq[s.token_begin + t], " and ", i,
                                                       " overlap at row ", s.token_begin + t));
      }
      row_seq[s.token_begin + t] = i;
    }
  }
  const BatchMetaLayout lay = BatchMetaLayoutOf(n_layers, n_seqs, row_seq.size());
  off_row_seq_ = lay.off_row_seq;
  off_k_ptrs_ = lay.off_k_ptrs;
  off_v_ptrs_ = lay.off_v_ptrs;
  const size_t total = lay.total;
  std::vector<char> host(total, 0);
  std::memcpy(host.data(), seqs.data(), sizeof(AttnSeq) * seqs.size());
  std::memcpy(host.data() + off_row_seq_, row_seq.data(), sizeof(int32_t) * row_seq.size());
  std::memcpy(host.data() + off_k_ptrs_, k_ptrs.data(), sizeof(void*) * k_ptrs.size());
  std::memcpy(host.data() + off_v_ptrs_, v_ptrs.data(), sizeof(void*) * v_ptrs.size());
  const void* old_meta = meta_.data();
  RETURN_IF_ERROR(EnsureBuffer(&meta_, total));
  if (meta_.data() != old_meta) ++layout_epoch_;
  // A decode-only batch gets its split plan on the device (fixed grid for the batch size): size the
  // partials for the most splits it may use, here, so that Attention uploads and allocates nothing.
  decode_only_ = true;
  for (const SeqSlice& s : batch.seqs) decode_only_ = decode_only_ && s.n_tokens == 1;
  // Batch-invariant mode: every batch gets the device plan for its decoding rows, with a split count fixed
  // by each sequence's length alone (not by the batch size, which sizes the grid for the SMs otherwise).
  max_splits_ = 0;
  if ((decode_only_ || batch_invariant_) && MmaHeadDimSupported(static_cast<int>(hd)) && n_kv > 0) {
    max_splits_ = batch_invariant_ ? kBatchInvariantDecodeSplits
                                   : DecodeMaxSplits(n_seqs, static_cast<int>(n_kv), sm_count_);
    if (max_splits_ > 1) {
      const void* old_partials = partials_.data();
      RETURN_IF_ERROR(EnsureBuffer(&partials_, DecodePartialsBytes(size_t(n_seqs) * max_splits_, static_cast<int>(n_kv),
                                                                   static_cast<int>(hd))));
      if (partials_.data() != old_partials) ++layout_epoch_;
    }
  }
  RETURN_IF_ERROR(Upload(batch_staging_, host.data(), total, meta_.data()));
  batch_ = batch;
  n_layers_ = n_layers;
  n_kv_ = static_cast<int>(n_kv);
  head_dim_ = static_cast<int>(hd);
  batch_valid_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::PlanAttention(int n_heads) {
  if (capturing_) {
    return absl::FailedPreconditionError("attention: this batch needs a host-built plan, which a graph cannot hold");
  }
  const int group = n_heads / n_kv_;
  std::vector<AttnWorkItem> prefill, decode;
  std::vector<AttnCombineItem> combine;
  const bool decode_ok = group <= kDecodeBlockM;
  // Batch-invariant mode: the decoding rows run with the device plan (Attention), not from these lists.
  const bool device_decode = max_splits_ > 0 && decode_ok;
  int64_t decode_keys = 0;
  for (const SeqSlice& s : batch_.seqs) {
    if (s.n_tokens == 1 && decode_ok) decode_keys += s.past_len + 1;
  }
  // Split sizes: enough CTAs (n_kv per split) for about two waves over the SMs.
  const int64_t target_ctas = 2 * int64_t{sm_count_};
  int64_t chunk = (decode_keys * n_kv_ + target_ctas - 1) / target_ctas;
  // At least two stages per split: below that the per-CTA prologue and merge dominate.
  chunk = std::max<int64_t>(2 * kDecodeKeysPerStage,
                            (chunk + kDecodeKeysPerStage - 1) / kDecodeKeysPerStage * kDecodeKeysPerStage);
  int slots = 0;
  prefill_item_begin_.assign(batch_.seqs.size() + 1, 0);
  for (int i = 0; i < static_cast<int>(batch_.seqs.size()); ++i) {
    const SeqSlice& s = batch_.seqs[i];
    // Prefill items stay grouped by sequence, in order: prefill staging launches them a few sequences at a time.
    prefill_item_begin_[i] = static_cast<int32_t>(prefill.size());
    if (s.n_tokens == 0 || (s.n_tokens == 1 && device_decode)) continue;
    if (s.n_tokens == 1 && decode_ok) {
      const int len = s.past_len + 1;
      int splits = static_cast<int>((len + chunk - 1) / chunk);
      if (splits == 1) {
        decode.push_back({i, 0, 0, len, -1, {}});
        continue;
      }
      // Equal parts (whole stages) rather than full chunks and a short tail.
      const int per = (len / splits + kDecodeKeysPerStage) / kDecodeKeysPerStage * kDecodeKeysPerStage;
      splits = (len + per - 1) / per;
      combine.push_back({i, slots, splits, 0});
      for (int j = 0; j < splits; ++j) {
        decode.push_back({i, 0, j * per, std::min(len, (j + 1) * per), slots + j, {}});
      }
      slots += splits;
      continue;
    }
    // Prefill tiles, the longest (last rows, most keys) first for a better tail.
    const int rows = s.n_tokens * group;
    for (int r0 = (rows - 1) / kPrefillBlockM * kPrefillBlockM; r0 >= 0; r0 -= kPrefillBlockM) {
      const int t_last = (std::min(rows, r0 + kPrefillBlockM) - 1) / group;
      prefill.push_back({i, r0, 0, s.past_len + t_last + 1, -1, {}});
    }
  }
  prefill_item_begin_.back() = static_cast<int32_t>(prefill.size());
  off_decode_ = PlanBytes(prefill.size(), 0, 0);
  off_combine_ = PlanBytes(prefill.size(), decode.size(), 0);
  const size_t total = PlanBytes(prefill.size(), decode.size(), combine.size());
  std::vector<char> host(total);
  if (!prefill.empty()) std::memcpy(host.data(), prefill.data(), off_decode_);
  if (!decode.empty()) std::memcpy(host.data() + off_decode_, decode.data(), sizeof(AttnWorkItem) * decode.size());
  if (!combine.empty()) std::memcpy(host.data() + off_combine_, combine.data(), sizeof(AttnCombineItem) * combine.size());
  RETURN_IF_ERROR(EnsureBuffer(&plan_, total));
  RETURN_IF_ERROR(Upload(plan_staging_, host.data(), total, plan_.data()));
  if (slots > 0) {
    off_lse_ = DecodePartialsLseOffset(slots, n_kv_, head_dim_);
    const void* old_partials = partials_.data();
    RETURN_IF_ERROR(EnsureBuffer(&partials_, DecodePartialsBytes(slots, n_kv_, head_dim_)));
    if (partials_.data() != old_partials) ++layout_epoch_;
  }
  n_prefill_items_ = static_cast<int>(prefill.size());
  n_decode_items_ = static_cast<int>(decode.size());
  n_combine_ = static_cast<int>(combine.size());
  planned_heads_ = n_heads;
  return absl::OkStatus();
}

absl::Status CudaBackend::KvAppendArgs(const char* op, int layer, const Tensor& k, const Tensor& v,
                                       KvAppendParams* p) {
  if (!batch_valid_) return absl::FailedPreconditionError(absl::StrCat(op, ": PrepareBatch was not called"));
  RETURN_IF_ERROR(CheckTensor(k, absl::StrCat(op, " k").c_str(), DType::kBF16, 3));
  RETURN_IF_ERROR(CheckSameShape(k, v, absl::StrCat(op, " k/v").c_str()));
  if (k.device() != DeviceKind::kCuda || v.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": k and v must be on the GPU"));
  }
  if (layer < 0 || layer >= n_layers_) return absl::InvalidArgumentError(absl::StrCat(op, ": layer ", layer, " out of range"));
  if (k.dim(0) != batch_.n_tokens || k.dim(1) != n_kv_ || k.dim(2) != head_dim_) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": k ", ShapeToString(k.shape()), ", expected [",
                                                   batch_.n_tokens, ", ", n_kv_, ", ", head_dim_, "]"));
  }
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  char* meta = static_cast<char*>(meta_.data());
  p->k = k.data();
  p->v = v.data();
  p->seqs = reinterpret_cast<const AttnSeq*>(meta) + size_t(layer) * n_seqs;
  p->row_seq = reinterpret_cast<const int32_t*>(meta + off_row_seq_);
  p->k_ptrs = reinterpret_cast<void* const*>(meta + off_k_ptrs_) + size_t(layer) * n_seqs;
  p->v_ptrs = reinterpret_cast<void* const*>(meta + off_v_ptrs_) + size_t(layer) * n_seqs;
  p->n_tokens = batch_.n_tokens;
  p->n_kv = n_kv_;
  p->head_dim = head_dim_;
  return absl::OkStatus();
}

absl::Status CudaBackend::KvAppend(int layer, const Tensor& k, const Tensor& v) {
  KvAppendParams p;
  RETURN_IF_ERROR(KvAppendArgs("kv_append", layer, k, v, &p));
  RETURN_IF_CUDA_ERROR(LaunchKvAppend(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Attention(int layer, const Tensor& q, float scale, Tensor* out) {
  if (!batch_valid_) return absl::FailedPreconditionError("attention: PrepareBatch was not called");
  RETURN_IF_ERROR(CheckTensor(q, "attention q", DType::kBF16, 3));
  RETURN_IF_ERROR(CheckSameShape(q, *out, "attention q/out"));
  if (q.device() != DeviceKind::kCuda || out->device() != DeviceKind::kCuda || out->dtype() != DType::kBF16) {
    return absl::InvalidArgumentError("attention: q and out must be bf16 on the GPU");
  }
  if (layer < 0 || layer >= n_layers_) return absl::InvalidArgumentError(absl::StrCat("attention: layer ", layer, " out of range"));
  const int64_t n_heads = q.dim(1);
  if (q.dim(0) != batch_.n_tokens || q.dim(2) != head_dim_ || n_heads % n_kv_ != 0 || n_heads == 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention: q ", ShapeToString(q.shape()), " does not fit ",
                                                   batch_.n_tokens, " tokens, ", n_kv_, " KV heads of dim ", head_dim_));
  }
  if (batch_.n_tokens == 0) return absl::OkStatus();
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  char* meta = static_cast<char*>(meta_.data());
  AttnParams p;
  p.q = q.data();
  p.out = out->data();
  p.seqs = reinterpret_cast<const AttnSeq*>(meta) + size_t(layer) * n_seqs;
  p.row_seq = reinterpret_cast<const int32_t*>(meta + off_row_seq_);
  p.k_ptrs = reinterpret_cast<const void* const*>(meta + off_k_ptrs_) + size_t(layer) * n_seqs;
  p.v_ptrs = reinterpret_cast<const void* const*>(meta + off_v_ptrs_) + size_t(layer) * n_seqs;
  p.n_heads = static_cast<int>(n_heads);
  p.n_kv = n_kv_;
  p.head_dim = head_dim_;
  p.scale = scale;
  p.n_tokens = batch_.n_tokens;
  if (!MmaHeadDimSupported(head_dim_)) {
    if (head_dim_ > 256) return absl::UnimplementedError(absl::StrCat("attention: head_dim ", head_dim_, " > 256"));
    RETURN_IF_CUDA_ERROR(LaunchAttentionSimple(p, stream_));
    return absl::OkStatus();
  }
  if (max_splits_ > 0 && n_heads / n_kv_ <= kDecodeBlockM) {
    AttnParams d = p;
    d.n_seqs = n_seqs;
    d.max_splits = max_splits_;
    if (max_splits_ > 1) {
      d.partial_o = partials_.as<float>();
      d.partial_lse = reinterpret_cast<float*>(static_cast<char*>(partials_.data()) +
                                               DecodePartialsLseOffset(size_t(n_seqs) * max_splits_, n_kv_, head_dim_));
    }
    // Decode-only: the whole batch. Batch-invariant mixed batch: its decoding rows (the kernels skip the
    // others), then the prefill tiles below; PlanAttention leaves the decoding rows out.
    RETURN_IF_CUDA_ERROR(LaunchAttentionDecode(d, stream_));
    if (decode_only_) return absl::OkStatus();
  }
  if (planned_heads_ != n_heads) RETURN_IF_ERROR(PlanAttention(static_cast<int>(n_heads)));
  char* plan = static_cast<char*>(plan_.data());
  if (!partials_.empty()) {
    p.partial_o = partials_.as<float>();
    p.partial_lse = reinterpret_cast<float*>(static_cast<char*>(partials_.data()) + off_lse_);
  }
  if (!decode_only_ && n_prefill_items_ > 0 && prefill_staging_limit_ > 0) {
    // Offloaded layers of a prefill: the tiles read a device copy instead of mapped host memory.
    bool done = false;
    RETURN_IF_ERROR(StagedPrefillAttention(layer, p, &done));
    if (done) return absl::OkStatus();
  }
  if (n_prefill_items_ > 0) {
    p.items = reinterpret_cast<const AttnWorkItem*>(plan);
    p.n_items = n_prefill_items_;
    RETURN_IF_CUDA_ERROR(LaunchAttentionMma(p, AttnKernel::kPrefill, stream_));
  }
  return LaunchPlannedDecode(p);
}

absl::Status CudaBackend::LaunchPlannedDecode(AttnParams p) {
  const char* plan = static_cast<const char*>(plan_.data());
  if (n_decode_items_ > 0) {
    p.items = reinterpret_cast<const AttnWorkItem*>(plan + off_decode_);
    p.n_items = n_decode_items_;
    RETURN_IF_CUDA_ERROR(LaunchAttentionMma(p, AttnKernel::kDecode, stream_));
  }
  if (n_combine_ > 0) {
    p.combine = reinterpret_cast<const AttnCombineItem*>(plan + off_combine_);
    p.n_combine = n_combine_;
    RETURN_IF_CUDA_ERROR(LaunchAttentionCombine(p, stream_));
  }
  return absl::OkStatus();
}

int64_t CudaBackend::AttentionWorkspaceBytes(const AttentionWorkspaceShape& shape) const {
  return DenseAttentionWorkspaceBytes(shape) + SparseAttentionWorkspaceBytes(shape);
}

// meta_, plan_ and partials_ at their largest for the steps of `s`, each as EnsureBuffer grows it.
int64_t CudaBackend::DenseAttentionWorkspaceBytes(const AttentionWorkspaceShape& s) const {
  if (s.n_layers <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.head_dim <= 0) return 0;
  auto bound = [](size_t most) { return AllocationBoundBytes(static_cast<int64_t>(GrownBufferBoundBytes(most))); };
  const int seqs = std::max(1, s.max_seqs), tokens = std::max(s.max_tokens, seqs);
  const int n_kv = s.n_kv_heads, hd = s.head_dim, group = s.n_heads / n_kv;
  int64_t bytes = bound(BatchMetaLayoutOf(s.n_layers, seqs, tokens).total);
  if (!MmaHeadDimSupported(hd)) return bytes;  // the simple kernel: no work lists, no partials
  // plan_: the prefill tiles (ceil(rows / kPrefillBlockM) per sequence, rows = its tokens x group), a decode
  // item per split slot or per unsplit sequence, a combine item per split sequence.
  const size_t planned_slots = group <= kDecodeBlockM ? PlannedDecodeSlotsBound(seqs, n_kv, sm_count_) : 0;
  const size_t tiles = (size_t(tokens) * group + kPrefillBlockM - 1) / kPrefillBlockM + size_t(seqs);
  bytes += bound(PlanBytes(tiles, planned_slots + seqs, seqs));
  // partials_: the host-built plan's slots, or the device plan's n_seqs x max_splits: decode-only batches of any
  // size up to seqs or, in the batch-invariant mode (the current one: the runtime sets it before the planner
  // measures), every batch with kBatchInvariantDecodeSplits.
  size_t slots = planned_slots;
  if (batch_invariant_) {
    slots = std::max(slots, size_t(seqs) * kBatchInvariantDecodeSplits);
  } else {
    for (int b = 1; b <= seqs; ++b) slots = std::max(slots, size_t(b) * DecodeMaxSplits(b, n_kv, sm_count_));
  }
  return bytes + bound(DecodePartialsBytes(slots, n_kv, hd));
}

}  // namespace specontext::cuda
