// CudaBackend: prefill attention of offloaded layers over a device copy of their K/V (cuda_backend_impl.h
// "prefill attention of offloaded layers from a device copy").
//
// Why: for an offloaded layer k/v[l] alias pinned host memory mapped into the device address space. The
// prefill kernel reads a sequence's keys once per 64-row query tile (kPrefillBlockM / group tokens), so a
// chunk of n tokens over a past of P rows moves about (n * group / 64) * P * row bytes over PCIe. Copying
// rows [0, P + n) once (bulk 2D copies, one per K/V and sequence) and running the same kernel over the copy
// moves (P + n) * row bytes, and the kernel reads HBM.
//
// Plan (once per batch, at the first Attention that needs it): each sequence with prefill items and an
// offloaded layer gets a region of the staging buffer ([n_kv, rows, head_dim] K then V, rows = P + n) at a
// fixed offset inside its round; rounds are consecutive sequences whose regions fit the limit, so one buffer
// of the largest round's size serves every round and layer. The kernels address K/V through per-(layer,
// sequence) tables: [AttnSeq x L*S][k ptr x L*S][v ptr x L*S], where a staged sequence of an offloaded layer
// has its staged pointers and capacity = rows (the per-head stride of the copy), every other entry the
// batch's own (the layer's own row count). They are uploaded once per batch.
//
// Per Attention(l), on the compute stream, in order: for each round, the copies of its sequences (after
// this step's KvAppendHost(l), which wrote the new rows into the host copy on the same stream), then the
// prefill tiles of its sequences (the plan keeps them grouped by sequence); then the decode tiles and the
// split merge of the batch with the same tables. The next round's copies overwrite the buffer only after
// the previous round's tiles, by stream order. Results are bitwise those of the direct path: same kernel,
// same work items, same bytes.
//
// Memory: the buffer is workspace, taken from the workspace cache at the batch's first staged layer and given
// back after its last, like the step's activations (the cache is trimmed when an allocation would pass the
// limit). One block size serves every batch (powers of two from 64 MiB up to the limit) so the cache returns
// the same block each step. When the device cannot hold it: the exact size, then smaller rounds (down to one
// sequence per round), then the direct path for the batch, with a warning. Decode-only batches never get here.
#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

size_t Align256(size_t v) { return (v + 255) / 256 * 256; }

// Drops `t`'s memory (copying an empty tensor: `t = Tensor()` draws a false -Wmaybe-uninitialized from GCC 12
// inside Abseil's InlinedVector).
void Drop(Tensor& t) {
  static const Tensor kNone;
  t = kNone;
}

}  // namespace

struct CudaBackend::PrefillStagingState {
  bool planned = false;
  uint64_t serial = 0;  // batch_serial_ the plan belongs to
  int heads = 0;        // planned_heads_ of the plan (the item ranges depend on it)
  bool active = false;  // some sequence is staged
  std::vector<uint8_t> layer_staged;  // [L]: a staged sequence has this layer offloaded
  std::vector<int64_t> rows;          // [S]: staged rows (0: not staged)
  std::vector<size_t> k_off, v_off;   // [S]: byte offsets of the sequence's K and V in buf
  std::vector<int> round_end;         // exclusive sequence index at the end of each round; last = S
  int last_layer = -1;                // the batch's last staged layer: buf goes back to the cache after it
  int64_t block = 0;                  // size asked of the workspace cache (one size, so the block is reused)
  Tensor buf;                         // kWorkspace: compute stream only
  Tensor tables;
  size_t off_k = 0, off_v = 0;
  PinnedStaging upload;

  // Packs the candidates (need[i] > 0 bytes, rows[i] rows) into rounds of at most `limit` bytes, in batch
  // order so that each round's prefill items are one range of the plan. Returns the largest round.
  int64_t AssignRounds(const std::vector<int64_t>& need, const std::vector<int64_t>& seq_rows, int64_t limit,
                       int64_t* n_staged, int64_t* n_direct) {
    const int n_seqs = static_cast<int>(need.size());
    rows.assign(n_seqs, 0);
    k_off.assign(n_seqs, 0);
    v_off.assign(n_seqs, 0);
    round_end.clear();
    *n_staged = *n_direct = 0;
    int64_t round = 0, max_round = 0;
    for (int i = 0; i < n_seqs; ++i) {
      if (need[i] == 0) continue;
      if (need[i] > limit) {
        ++*n_direct;
        continue;
      }
      if (round + need[i] > limit) {
        round_end.push_back(i);
        round = 0;
      }
      rows[i] = seq_rows[i];
      k_off[i] = static_cast<size_t>(round);
      v_off[i] = static_cast<size_t>(round + need[i] / 2);
      round += need[i];
      max_round = std::max(max_round, round);
      ++*n_staged;
    }
    round_end.push_back(n_seqs);
    return max_round;
  }

  ~PrefillStagingState() {
    if (upload.ready != nullptr) cudaEventDestroy(upload.ready);
    if (upload.host != nullptr) cudaFreeHost(upload.host);
  }
};

absl::Status CudaBackend::PlanPrefillStaging(PrefillStagingState* st) {
  st->planned = true;
  st->serial = batch_serial_;
  st->heads = planned_heads_;
  st->active = false;
  st->last_layer = -1;
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  st->layer_staged.assign(n_layers_, 0);
  const size_t row_bytes = size_t(head_dim_) * sizeof(uint16_t);
  // Candidates: sequences with prefill tiles and an offloaded layer. Region: K then V, each 256-aligned.
  std::vector<int64_t> need(n_seqs, 0), seq_rows(n_seqs, 0);
  int64_t largest = 0, floor = 0;  // largest need; largest need within the limit (one such sequence per round)
  for (int i = 0; i < n_seqs; ++i) {
    const SequenceKv* kv = batch_.kv[i];
    bool any_offloaded = false;
    for (int l = 0; l < n_layers_ && !any_offloaded; ++l) any_offloaded = kv->offloaded(l);
    if (!any_offloaded || prefill_item_begin_[i + 1] == prefill_item_begin_[i]) continue;
    seq_rows[i] = int64_t{batch_.seqs[i].past_len} + batch_.seqs[i].n_tokens;
    need[i] = 2 * static_cast<int64_t>(Align256(size_t(n_kv_) * seq_rows[i] * row_bytes));
    largest = std::max(largest, need[i]);
    if (need[i] <= prefill_staging_limit_) floor = std::max(floor, need[i]);
  }
  int64_t limit = prefill_staging_limit_, n_staged = 0, n_direct = 0;
  int64_t max_round = st->AssignRounds(need, seq_rows, limit, &n_staged, &n_direct);
  if (n_direct > 0) {
    SPC_LOG(WARNING) << "prefill staging: K/V of some sequences exceed the staging limit; their offloaded layers "
                        "read host memory directly (slow)"
                     << Kv("sequences", n_direct) << Kv("largest_bytes", largest) << Kv("limit", limit);
  }
  // The buffer is transient workspace (given back after the batch's last staged layer, so the cache can trim
  // it under pressure). When the device cannot hold the planned rounds, smaller rounds are tried (down to one
  // sequence per round) before giving up on staging for this batch.
  // One block size for every batch (powers of two from 64 MiB, at most the limit, never shrinking) so that the
  // cache hands the same block back each step and holds at most one outgrown block per size.
  if (st->block > limit) st->block = 0;  // the limit was lowered
  if (n_staged > 0 && st->block < max_round) {
    int64_t pow2 = int64_t{64} << 20;
    while (pow2 < max_round) pow2 *= 2;
    st->block = std::max(max_round, std::min(pow2, limit));
  }
  int64_t bytes = st->block;
  while (n_staged > 0) {
    Drop(st->buf);
    absl::StatusOr<Tensor> buf = memory_->Alloc(DType::kU8, {bytes}, MemoryKind::kWorkspace);
    if (buf.ok()) {
      st->buf = *std::move(buf);
      break;
    }
    st->block = 0;
    if (bytes > max_round) {  // first the exact size, then smaller rounds
      bytes = max_round;
      continue;
    }
    if (max_round <= floor) {
      SPC_LOG(WARNING) << "prefill staging: no device memory for the staging buffer; offloaded layers of this "
                          "batch read host memory directly (slow)"
                       << Kv("bytes", bytes) << Kv("error", buf.status().ToString());
      n_direct += n_staged;
      n_staged = 0;
      break;
    }
    limit = std::max(floor, max_round / 2);
    max_round = st->AssignRounds(need, seq_rows, limit, &n_staged, &n_direct);
    bytes = max_round;
  }
  prefill_staging_stats_.direct_seqs += n_direct;
  if (n_staged == 0) return absl::OkStatus();

  const size_t n = size_t(n_layers_) * n_seqs;
  std::vector<AttnSeq> seqs(n);
  std::vector<const void*> k_ptrs(n), v_ptrs(n);
  char* base = static_cast<char*>(st->buf.data());
  for (int l = 0; l < n_layers_; ++l) {
    for (int i = 0; i < n_seqs; ++i) {
      const SeqSlice& s = batch_.seqs[i];
      const SequenceKv* kv = batch_.kv[i];
      const size_t e = size_t(l) * n_seqs + i;
      const bool staged = st->rows[i] > 0 && kv->offloaded(l);
      const KvRowsView r = KvRowsOf(kv->k[l], kv->v[l]);  // the batch's own (an interleaved host pair too)
      seqs[e] = AttnSeq{s.token_begin, s.n_tokens, s.past_len, static_cast<int32_t>(staged ? st->rows[i] : r.rows),
                        static_cast<int32_t>(staged ? r.head_dim : r.stride)};
      k_ptrs[e] = staged ? base + st->k_off[i] : r.k;
      v_ptrs[e] = staged ? base + st->v_off[i] : r.v;
      if (staged) {
        st->layer_staged[l] = 1;
        st->last_layer = l;
      }
    }
  }
  st->off_k = Align256(sizeof(AttnSeq) * n);
  st->off_v = st->off_k + sizeof(void*) * n;
  const size_t total = st->off_v + sizeof(void*) * n;
  std::vector<char> host(total, 0);
  std::memcpy(host.data(), seqs.data(), sizeof(AttnSeq) * n);
  std::memcpy(host.data() + st->off_k, k_ptrs.data(), sizeof(void*) * n);
  std::memcpy(host.data() + st->off_v, v_ptrs.data(), sizeof(void*) * n);
  RETURN_IF_ERROR(EnsureDeviceBuffer(*memory_, &st->tables, total, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(StagedUpload(st->upload, host.data(), total, st->tables.data(), stream_));
  st->active = true;
  prefill_staging_stats_.max_rounds =
      std::max<int64_t>(prefill_staging_stats_.max_rounds, static_cast<int64_t>(st->round_end.size()));
  return absl::OkStatus();
}

absl::Status CudaBackend::StagedPrefillAttention(int layer, AttnParams p, bool* done) {
  *done = false;
  if (capturing_ || !MmaHeadDimSupported(head_dim_)) return absl::OkStatus();
  // Cheap exit for batches without offloaded layers (most prefills): no state, no plan.
  bool any = false;
  for (const SequenceKv* kv : batch_.kv) any = any || kv->offloaded(layer);
  if (!any) return absl::OkStatus();
  if (prefill_staging_ == nullptr) {
    auto st = std::make_shared<PrefillStagingState>();
    RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&st->upload.ready, cudaEventDisableTiming));
    prefill_staging_ = std::move(st);
  }
  PrefillStagingState* st = prefill_staging_.get();
  if (!st->planned || st->serial != batch_serial_ || st->heads != planned_heads_) {
    RETURN_IF_ERROR(PlanPrefillStaging(st));
  }
  if (!st->active || !st->layer_staged[layer]) return absl::OkStatus();

  const int n_seqs = static_cast<int>(batch_.seqs.size());
  char* tab = static_cast<char*>(st->tables.data());
  p.seqs = reinterpret_cast<const AttnSeq*>(tab) + size_t(layer) * n_seqs;
  p.k_ptrs = reinterpret_cast<const void* const*>(tab + st->off_k) + size_t(layer) * n_seqs;
  p.v_ptrs = reinterpret_cast<const void* const*>(tab + st->off_v) + size_t(layer) * n_seqs;
  const char* plan = static_cast<const char*>(plan_.data());
  char* base = static_cast<char*>(st->buf.data());
  const size_t row_bytes = size_t(head_dim_) * sizeof(uint16_t);
  int begin = 0;
  for (const int end : st->round_end) {
    for (int i = begin; i < end; ++i) {
      const SequenceKv* kv = batch_.kv[i];
      if (st->rows[i] == 0 || !kv->offloaded(layer)) continue;
      // [n_kv, capacity, hd] host rows [0, rows) of every head -> [n_kv, rows, hd] compact.
      const size_t width = size_t(st->rows[i]) * row_bytes, pitch = size_t(kv->k[layer].dim(1)) * row_bytes;
      if (IsKvPair(kv->k[layer])) {  // interleaved host K/V: per (head, K/V) strided copies
        RETURN_IF_ERROR(CopyKvPairOnStream({base + st->k_off[i], st->rows[i], base + st->v_off[i], st->rows[i],
                                            static_cast<char*>(kv->k[layer].data()), kv->k[layer].dim(1), n_kv_,
                                            st->rows[i], static_cast<int64_t>(row_bytes), /*to_pair=*/false,
                                            KvRowsOf(kv->k[layer], kv->v[layer]).stride * int64_t{sizeof(uint16_t)}}));
      } else {
        RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(base + st->k_off[i], width, kv->k[layer].data(), pitch, width, n_kv_,
                                               cudaMemcpyDefault, stream_));
        RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(base + st->v_off[i], width, kv->v[layer].data(), pitch, width, n_kv_,
                                               cudaMemcpyDefault, stream_));
      }
      prefill_staging_stats_.staged_copies += 1;
      prefill_staging_stats_.staged_bytes += static_cast<int64_t>(2 * width * n_kv_);
    }
    const int item0 = prefill_item_begin_[begin], item1 = prefill_item_begin_[end];
    if (item1 > item0) {
      p.items = reinterpret_cast<const AttnWorkItem*>(plan) + item0;
      p.n_items = item1 - item0;
      RETURN_IF_CUDA_ERROR(LaunchAttentionMma(p, AttnKernel::kPrefill, stream_));
    }
    begin = end;
  }
  RETURN_IF_ERROR(LaunchPlannedDecode(p));
  prefill_staging_stats_.staged_layers += 1;
  if (layer == st->last_layer) {
    // Back to the workspace cache (stream-ordered reuse is safe: one stream), where allocations past the limit
    // can trim it, like the step's other activations. A later Attention of this batch plans again.
    Drop(st->buf);
    st->planned = false;
  }
  *done = true;
  return absl::OkStatus();
}

}  // namespace specontext::cuda
