// CudaSelectTopB: validates on the host (same rules as SelectTopB), uploads one per-sequence table,
// runs the selection kernels on the backend's compute stream and copies the CSR positions, the captured
// mass and the error flag back in one copy through a pinned buffer of the backend. The deferred variant
// (StartSelectIndexSets / FinishSelectIndexSets) writes them into the sparse state's index-set buffer
// instead, where the forward reads the positions, and brings them down on the copy stream.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/cuda/kernels/selection_kernels.h"
#include "core/cuda/selection.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status CheckQuery(const SelectionQuery& s, size_t i, int64_t* n_q, int64_t* n_kv, int64_t* hd) {
  const Tensor &q = s.q, &k = s.k_cache;
  auto ok_type = [](const Tensor& t) { return t.dtype() == DType::kF32 || t.dtype() == DType::kBF16; };
  if (q.empty() || !ok_type(q) || q.ndim() != 2 || q.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("cuda selection: seq ", i,
                                                   " q must be f32/bf16 on the GPU [n_q_heads, head_dim], got ",
                                                   q.DebugString()));
  }
  if (k.empty() || !ok_type(k) || k.ndim() != 3 || k.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("cuda selection: seq ", i,
                                                   " k_cache must be f32/bf16 on the GPU [n_kv_heads, capacity, "
                                                   "head_dim], got ",
                                                   k.DebugString()));
  }
  if (i == 0) {
    *n_q = q.dim(0);
    *n_kv = k.dim(0);
    *hd = q.dim(1);
    if (*n_kv <= 0 || *n_q % *n_kv != 0 || *hd <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cuda selection: n_q_heads=", *n_q,
                                                     " must be a positive multiple of n_kv_heads=", *n_kv));
    }
  }
  if (q.dim(0) != *n_q || q.dim(1) != *hd || k.dim(0) != *n_kv || k.dim(2) != *hd) {
    return absl::InvalidArgumentError(absl::StrCat("cuda selection: seq ", i, " shapes q ", q.DebugString(), " k ",
                                                   k.DebugString(), " differ from the batch's"));
  }
  if (s.len < 0 || s.len > k.dim(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda selection: seq ", i, " len ", s.len, " outside [0, capacity=", k.dim(1), "]"));
  }
  return absl::OkStatus();
}

size_t Align256(size_t v) { return (v + 255) / 256 * 256; }

// The workspace block's parts: [seqs][logits][stats][combined][indices][mass][flag], each 256-aligned.
// SetUpSelection allocates it; CudaBackend::SelectionWorkspaceBytes bounds it for the memory planner.
struct SelectionBlock {
  size_t seqs = 0, logits = 0, stats = 0, combined = 0, indices = 0, mass = 0;
  size_t total() const { return seqs + logits + stats + combined + indices + mass + 256; }
};

SelectionBlock SelectionBlockLayout(int n_seqs, int64_t n_q, int64_t sets_per_seq, int32_t max_len, int32_t total) {
  SelectionBlock b;
  b.seqs = Align256(sizeof(cuda::SelSeq) * n_seqs);
  b.logits = Align256(sizeof(float) * size_t(n_seqs) * n_q * max_len);
  b.stats = Align256(sizeof(float) * cuda::SelectionStatsFloats(n_seqs, static_cast<int>(n_q), max_len));
  b.combined = Align256(sizeof(float) * size_t(n_seqs) * sets_per_seq * max_len);
  b.indices = Align256(sizeof(int32_t) * std::max<int32_t>(total, 1));
  b.mass = Align256(sizeof(float) * size_t(n_seqs) * n_q);
  return b;
}

// What SelectTopB and the deferred selection share: the validated batch, `out`'s layout, the kernels'
// parameters over one workspace block and the per-sequence table to upload.
struct SelectionLaunch {
  cuda::SelectionParams p;
  std::vector<cuda::SelSeq> seqs;
  Tensor work;               // [seqs][logits][stats][combined] (+ [indices][mass][flag] unless redirected)
  // Bytes of the pinned buffer the per-sequence table goes up through (what comes down follows them).
  size_t up_bytes() const { return Align256(sizeof(cuda::SelSeq) * seqs.size()); }
};

// Uploads the per-sequence table through pinned `up`, clears the error flag and launches the kernels.
absl::Status UploadAndLaunch(const SelectionLaunch& l, char* up, cudaStream_t stream) {
  std::memcpy(up, l.seqs.data(), sizeof(cuda::SelSeq) * l.seqs.size());
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(const_cast<cuda::SelSeq*>(l.p.seqs), up, sizeof(cuda::SelSeq) * l.seqs.size(),
                                       cudaMemcpyHostToDevice, stream));
  RETURN_IF_CUDA_ERROR(cudaMemsetAsync(l.p.error_flag, 0, sizeof(int), stream));
  RETURN_IF_CUDA_ERROR(cuda::LaunchSelection(l.p, stream));
  return absl::OkStatus();
}

// Validates `batch`, lays out `out` (seq_len, indptr, indices sized) and allocates the kernels' workspace
// (the deferred selection then points the kernels' [indices][mass][flag] at its own device buffer).
absl::Status SetUpSelection(Backend& backend, std::span<const SelectionQuery> batch, const SelectionOptions& options,
                            SelectionResult* out, SelectionLaunch* l) {
  if (out == nullptr) return absl::InvalidArgumentError("cuda selection: no output");
  RETURN_IF_ERROR(ValidateBudget(options.budget, options.sink, 0));
  if (batch.empty()) return absl::InvalidArgumentError("cuda selection: empty batch");
  int64_t n_q = 0, n_kv = 0, hd = 0;
  int32_t max_budget = options.budget;
  for (size_t i = 0; i < batch.size(); ++i) {
    RETURN_IF_ERROR(CheckQuery(batch[i], i, &n_q, &n_kv, &hd));
    if (batch[i].q.dtype() != batch[0].q.dtype() || batch[i].k_cache.dtype() != batch[0].k_cache.dtype()) {
      return absl::InvalidArgumentError(absl::StrCat("cuda selection: seq ", i, " dtypes differ from seq 0's"));
    }
    if (batch[i].budget != 0) {
      RETURN_IF_ERROR(ValidateBudget(batch[i].budget, options.sink, 0));
      max_budget = std::max(max_budget, batch[i].budget);
    }
  }
  const bool batch_level = options.mode == SelectionMode::kBatchLevel;
  const int64_t sets_per_seq = batch_level ? 1 : n_kv;
  const int n_seqs = static_cast<int>(batch.size());

  out->pending = false;
  out->sets.Reset(n_seqs, static_cast<int32_t>(n_kv), static_cast<int32_t>(sets_per_seq), max_budget);
  out->n_q_heads = static_cast<int32_t>(n_q);
  l->seqs.resize(n_seqs);
  int32_t max_len = 0, total = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const SelectionQuery& s = batch[i];
    const int32_t budget = s.budget != 0 ? s.budget : options.budget;
    const int32_t k_sel = std::min(budget, s.len);
    const int32_t keep = std::max(0, std::min({options.sink, k_sel, s.len}));
    l->seqs[i] = {s.q.data(), s.k_cache.data(), s.k_cache.dim(1), s.len, k_sel, keep, total};
    out->sets.seq_len[i] = s.len;
    for (int64_t set = 0; set < sets_per_seq; ++set) {
      total += k_sel;
      out->sets.indptr.push_back(total);
    }
    max_len = std::max(max_len, s.len);
  }
  out->sets.indices.resize(total);
  out->captured_mass.assign(size_t(n_seqs) * n_q, 0.0f);

  // One workspace block: [seqs][logits][stats][combined][indices][mass][flag].
  const SelectionBlock block = SelectionBlockLayout(n_seqs, n_q, sets_per_seq, max_len, total);
  const size_t b_seqs = block.seqs, b_logits = block.logits, b_stats = block.stats, b_comb = block.combined;
  const size_t b_idx = block.indices, b_mass = block.mass;
  const size_t bytes = block.total();
  ASSIGN_OR_RETURN(l->work, backend.Alloc(DType::kU8, {static_cast<int64_t>(bytes)}, MemoryKind::kWorkspace));
  char* base = static_cast<char*>(l->work.data());
  cuda::SelectionParams& p = l->p;
  p.seqs = reinterpret_cast<const cuda::SelSeq*>(base);
  p.logits = reinterpret_cast<float*>(base + b_seqs);
  p.stats = reinterpret_cast<float*>(base + b_seqs + b_logits);
  p.combined = reinterpret_cast<float*>(base + b_seqs + b_logits + b_stats);
  p.indices = reinterpret_cast<int32_t*>(base + b_seqs + b_logits + b_stats + b_comb);
  p.mass = reinterpret_cast<float*>(base + b_seqs + b_logits + b_stats + b_comb + b_idx);
  p.error_flag = reinterpret_cast<int*>(base + b_seqs + b_logits + b_stats + b_comb + b_idx + b_mass);
  p.n_seqs = n_seqs;
  p.n_q = static_cast<int>(n_q);
  p.n_kv = static_cast<int>(n_kv);
  p.head_dim = static_cast<int>(hd);
  p.sets_per_seq = static_cast<int>(sets_per_seq);
  p.heads_per_set = static_cast<int>(batch_level ? n_q : n_q / n_kv);
  p.max_len = max_len;
  p.scale = options.scale != 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  p.q_bf16 = batch[0].q.dtype() == DType::kBF16;
  p.k_bf16 = batch[0].k_cache.dtype() == DType::kBF16;
  return absl::OkStatus();
}

// Copies the downloaded [indices][mass][flag] (`down`, laid out from `idx_bytes` and `mass_bytes`) into
// `out` (sized for them); InvalidArgument when the kernels flagged a non-finite score.
absl::Status TakeResults(const char* down, size_t idx_bytes, size_t mass_bytes, SelectionResult* out) {
  int flag = 0;
  std::memcpy(&flag, down + idx_bytes + mass_bytes, sizeof(int));
  if (flag != 0) return absl::InvalidArgumentError("cuda selection: a query head has a non-finite score");
  if (!out->sets.indices.empty()) {
    std::memcpy(out->sets.indices.data(), down, sizeof(int32_t) * out->sets.indices.size());
  }
  std::memcpy(out->captured_mass.data(), down + idx_bytes, sizeof(float) * out->captured_mass.size());
  return absl::OkStatus();
}

// `pinned`: a pinned host buffer the results come down through (grown here; the call waits for the copy).
absl::Status SelectTopB(Backend& backend, std::span<const SelectionQuery> batch, const SelectionOptions& options,
                        SelectionResult* out, cuda::PinnedStaging& pinned) {
  ASSIGN_OR_RETURN(void* stream_ptr, CudaComputeStream(backend));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SelectionLaunch l;
  RETURN_IF_ERROR(SetUpSelection(backend, batch, options, out, &l));
  const cuda::SelectionParams& p = l.p;
  // Both directions go through the pinned buffer: [seqs up | indices, mass, flag down] (the down part
  // mirrors the workspace's contiguous [indices][mass][flag] so that one copy brings all of it). Pageable
  // copies were staged by the driver, and the 2 MB of indices of 32 sequences x 8 heads x B 2048 came down
  // at a fraction of the link's speed.
  const size_t b_idx = reinterpret_cast<const char*>(p.mass) - reinterpret_cast<const char*>(p.indices);
  const size_t b_mass = reinterpret_cast<const char*>(p.error_flag) - reinterpret_cast<const char*>(p.mass);
  const size_t down_bytes = b_idx + b_mass + sizeof(int);
  RETURN_IF_ERROR(cuda::GrowPinned(pinned, l.up_bytes() + down_bytes));
  char* up = static_cast<char*>(pinned.host);
  char* down = up + l.up_bytes();
  RETURN_IF_ERROR(UploadAndLaunch(l, up, stream));
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(down, p.indices, down_bytes, cudaMemcpyDeviceToHost, stream));
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  return TakeResults(down, b_idx, b_mass, out);
}

}  // namespace

absl::Status CudaSelectTopB(Backend& backend, std::span<const SelectionQuery> batch, const SelectionOptions& options,
                            SelectionResult* out) {
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(&backend);
  if (cuda == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cuda selection: backend ", backend.name(), " is not CUDA"));
  }
  return cuda->SelectIndexSets(batch.data(), batch.size(), options, out);
}

// The backend's selection op (Backend::SelectIndexSets): the kernel path, downloading through the sparse
// state's pinned buffer.
absl::Status cuda::CudaBackend::SelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                                                SelectionResult* out) {
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  RETURN_IF_ERROR(WaitPendingSelection(sp));  // its copies read the pinned buffer this call reuses
  return SelectTopB(*this, std::span<const SelectionQuery>(batch, n), options, out, sp->select_pinned);
}

int64_t cuda::CudaBackend::SelectionWorkspaceBytes(int32_t n_seqs, int32_t n_q, int32_t sets_per_seq,
                                                   int32_t max_len, int32_t budget) const {
  if (n_seqs <= 0 || max_len <= 0) return 0;
  const int32_t total = n_seqs * sets_per_seq * std::min(budget, max_len);
  const SelectionBlock block = SelectionBlockLayout(n_seqs, n_q, sets_per_seq, max_len, total);
  return AllocationBoundBytes(static_cast<int64_t>(block.total()));
}

// The deferred selection: the kernels write the positions straight into the sparse state's index-set
// buffer (where PrepareSparseDecode with positions_on_device leaves them) and the captured mass and error
// flag after them; the copy stream brings [positions][mass][flag] down to the pinned buffer behind the
// kernels while the compute stream goes on with the forward.
absl::Status cuda::CudaBackend::StartSelectIndexSets(const SelectionQuery* batch, size_t n,
                                                     const SelectionOptions& options, SelectionResult* out) {
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  RETURN_IF_ERROR(WaitPendingSelection(sp));
  SelectionLaunch l;
  RETURN_IF_ERROR(SetUpSelection(*this, std::span<const SelectionQuery>(batch, n), options, out, &l));
  SelectLayout& lay = sp->select_layout;
  lay = SelectLayoutOf(out->sets.indptr.size(), out->sets.indices.size(), out->captured_mass.size());
  ++sp->select_epoch;
  // The previous step's copies (loads, their list) are done by now; order the buffer's rewrite after them.
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->copy_mark, sp->copy));
  RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(stream_, sp->copy_mark, 0));
  RETURN_IF_ERROR(EnsureBuffer(&sp->sets_buf, lay.bytes));
  char* buf = static_cast<char*>(sp->sets_buf.data());
  l.p.indices = reinterpret_cast<int32_t*>(buf + lay.off_pos);
  l.p.mass = reinterpret_cast<float*>(buf + lay.off_pos + lay.idx_bytes);
  l.p.error_flag = reinterpret_cast<int*>(buf + lay.off_pos + lay.idx_bytes + lay.mass_bytes);
  RETURN_IF_ERROR(cuda::GrowPinned(sp->select_pinned, l.up_bytes() + lay.down_bytes()));
  char* up = static_cast<char*>(sp->select_pinned.host);
  RETURN_IF_ERROR(UploadAndLaunch(l, up, stream_));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->select_mark, stream_));
  RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(sp->copy, sp->select_mark, 0));
  char* down = up + l.up_bytes();
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(down, buf + lay.off_pos, lay.down_bytes(), cudaMemcpyDeviceToHost, sp->copy));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->select_done, sp->copy));
  sp->select_pending = true;
  sp->select_down = down;
  out->pending = true;
  return absl::OkStatus();
}

absl::Status cuda::CudaBackend::FinishSelectIndexSets(SelectionResult* out) {
  if (out == nullptr || !out->pending) return absl::OkStatus();
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  if (!sp->select_pending) {
    return absl::FailedPreconditionError("cuda selection: no pending selection to finish");
  }
  const SelectLayout& lay = sp->select_layout;
  if (out->sets.indices.size() != lay.n_idx || out->captured_mass.size() != lay.mass_floats) {
    return absl::FailedPreconditionError("cuda selection: the result does not belong to the pending selection");
  }
  RETURN_IF_CUDA_ERROR(cudaEventSynchronize(sp->select_done));
  sp->select_pending = false;
  out->pending = false;
  return TakeResults(sp->select_down, lay.idx_bytes, lay.mass_bytes, out);
}

absl::Status cuda::CudaBackend::WaitPendingSelection(SparseState* sp) {
  if (!sp->select_pending) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaEventSynchronize(sp->select_done));
  sp->select_pending = false;
  return absl::OkStatus();
}

}  // namespace specontext
