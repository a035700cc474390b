// Internal state of CudaBackend's KV tiers and sparse decode (cuda_sparse.cc, cuda_sparse_ops.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/kernels/sparse_kernels.h"
#include "core/sparse/elastic.h"

namespace specontext::cuda {

inline size_t Align16Bytes(size_t v) { return (v + 15) / 16 * 16; }

// Live pinned host bytes per kind; outlives the backend through the tensors' deleters.
struct HostCounters {
  std::atomic<int64_t> bytes[static_cast<size_t>(MemoryKind::kCount)] = {};
  std::atomic<int64_t> total{0};
  std::atomic<int64_t> peak{0};
};

// Where the deferred selection (StartSelectIndexSets) puts its results in SparseState::sets_buf:
// [indptr][positions][mass][flag][slots], the middle three downloaded in one copy. (A host upload,
// PrepareSparseDecode, lays out [indptr][positions][slots][dense_len].)
struct SelectLayout {
  bool valid = false;  // sets_buf holds this selection's positions (a host upload of positions clears it)
  size_t n_ptr = 0, n_idx = 0, mass_floats = 0;
  size_t off_pos = 0, idx_bytes = 0, mass_bytes = 0, off_slots = 0, bytes = 0;
  size_t down_bytes() const { return idx_bytes + mass_bytes + sizeof(int); }
};
inline SelectLayout SelectLayoutOf(size_t n_ptr, size_t n_idx, size_t mass_floats) {
  SelectLayout l;
  l.valid = true;
  l.n_ptr = n_ptr;
  l.n_idx = n_idx;
  l.mass_floats = mass_floats;
  l.off_pos = Align16Bytes(sizeof(int32_t) * n_ptr);
  l.idx_bytes = Align16Bytes(sizeof(int32_t) * std::max<size_t>(n_idx, 1));
  l.mass_bytes = Align16Bytes(sizeof(float) * mass_floats);
  l.off_slots = l.off_pos + l.idx_bytes + l.mass_bytes + 16;
  l.bytes = l.off_slots + sizeof(int32_t) * std::max<size_t>(n_idx, 1);
  return l;
}

// The per-(layer, sequence) tables of EnsureTierTables (sp->tables, kPrefetch):
// [SparseKvPtrs x L*S][ElasticSeqPtrs x L*S at off_elastic].
struct TierTablesLayout {
  size_t off_elastic = 0, total = 0;
};
inline TierTablesLayout TierTablesLayoutOf(size_t n_layers, size_t n_seqs) {
  TierTablesLayout l;
  l.off_elastic = Align16Bytes(sizeof(SparseKvPtrs) * n_layers * n_seqs);
  l.total = l.off_elastic + sizeof(ElasticSeqPtrs) * n_layers * n_seqs;
  return l;
}

// PrepareSparseDecode's upload of host positions into sets_buf: [indptr][positions][slots] and, when a sequence
// is flagged dense_resident, [dense_len i32 x n_seqs] at off_dense.
struct SetsUploadLayout {
  size_t off_pos = 0, off_slots = 0, off_dense = 0, total = 0;
};
inline SetsUploadLayout SetsUploadLayoutOf(size_t n_ptr, size_t n_idx, bool has_slots, bool has_dense, size_t n_seqs) {
  SetsUploadLayout l;
  l.off_pos = Align16Bytes(sizeof(int32_t) * n_ptr);
  l.off_slots = l.off_pos + Align16Bytes(sizeof(int32_t) * n_idx);
  l.total = std::max<size_t>(l.off_slots + sizeof(int32_t) * (has_slots ? n_idx : 0), 16);
  if (has_dense) {
    l.off_dense = Align16Bytes(l.total);
    l.total = l.off_dense + sizeof(int32_t) * n_seqs;
  }
  return l;
}

struct CudaBackend::SparseState {
  cudaStream_t copy = nullptr;
  std::shared_ptr<HostCounters> host = std::make_shared<HostCounters>();
  std::vector<cudaEvent_t> load_done, attn_done, append_done;  // per layer
  cudaEvent_t copy_mark = nullptr;                // scratch: cross-stream ordering points
  cudaEvent_t compute_mark = nullptr;
  cudaEvent_t tables_ready = nullptr;

  // Per-(layer, seq) tables: [SparseKvPtrs x L*S][ElasticSeqPtrs x L*S]; host copies for staleness checks.
  std::vector<SparseKvPtrs> attn_tab;
  std::vector<ElasticSeqPtrs> elastic_tab;
  std::vector<const SequenceKv*> tab_kv;
  Tensor tables;
  size_t off_elastic = 0;
  PinnedStaging table_staging;

  // Index sets of the step: [indptr][positions][slots].
  bool sets_valid = false;
  int n_seqs = 0, sets_per_seq = 1, n_set_kv = 0;
  bool has_slots = false;
  int64_t sum_keys = 0;  // Σ over (seq, KV head) of |set| + 1
  int max_keys = 0;
  // SparseDecodeDesc::dense_resident: whether some sequence is flagged, then its dense_len array [n_seqs]
  // (past or -1) at off_dense of sets_buf and the resident layers' plan inputs, the flagged sequences' lists
  // counted at their past rounded up to kDensePlanKeys (so that the plan, and a step graph recorded with it,
  // stays the same for many steps while the flagged sequences grow).
  bool has_dense = false;
  size_t off_dense = 0;
  int64_t dense_sum_keys = 0;
  int dense_max_keys = 0;
  static constexpr int kDensePlanKeys = 1024;
  Tensor sets_buf;
  size_t off_pos = 0, off_slots = 0;
  PinnedStaging sets_staging;
  // The slots of a step whose positions stayed on the device go up on the copy stream (`ready` recorded there):
  // only offloaded layers read them, after their load_done.
  PinnedStaging slots_staging;
  Tensor partials;
  // The prepared layout on the host (PrepareSparseDecode): per-layer selection sizes its work from it.
  std::vector<int32_t> host_indptr;
  // Per-layer selection (cuda_layer_selection.cc): the oracle's table and the selection kernels' work, or
  // Quest's page scores; compute stream only.
  Tensor layer_work;

  // Selection results come down through this (cuda_selection.cc): SelectIndexSets waits for its copy; a
  // started selection is pending until FinishSelectIndexSets waits for select_done (on the copy stream,
  // after select_mark on the compute stream behind the kernels).
  PinnedStaging select_pinned;
  SelectLayout select_layout;
  uint64_t select_epoch = 0;   // bumped by every StartSelectIndexSets
  uint64_t indptr_select = 0;  // the select_epoch whose layout (indptr) sets_buf holds; 0: none
  bool select_pending = false;
  const char* select_down = nullptr;  // [positions][mass][flag] in select_pinned
  cudaEvent_t select_mark = nullptr, select_done = nullptr;

  // Copy list last uploaded (reused while identical) and its per-seq bounds.
  std::vector<int32_t> last_ptr;
  std::vector<RowCopy> last_copies;
  int last_sets_per_seq = 0;
  std::vector<int32_t> max_token, max_slot;  // [n_seqs], -1 when none
  // The list object last passed to ElasticLoad and the PrepareSparseDecode it came in (SameList).
  const CopyList* last_list = nullptr;
  uint64_t last_list_epoch = 0;
  uint64_t decode_epoch = 0;  // bumped by every PrepareSparseDecode
  Tensor copies_buf;
  int64_t n_copies = 0;
  PinnedStaging copy_staging;  // `ready` recorded on the copy stream

  // Copy time hidden vs exposed (ElasticCounters::copy_*), per layer, timing events: load start/end on the
  // copy stream; compute arrival at the layer's wait and passing it on the compute stream. `timing` bit 1:
  // a load was recorded, bit 2: its wait was recorded; read back at the layer's next ElasticLoad.
  std::vector<cudaEvent_t> t_load_start, t_load_end, t_wait_arrive, t_wait_pass;
  std::vector<uint8_t> timing;
  std::vector<int32_t> timed_layers;  // layers the timed load of a layer's gather moved (a group's run: several)
  std::vector<int> capture_waits;     // layers whose load wait the step graph being recorded holds

  ~SparseState() {
    if (copy != nullptr) cudaStreamSynchronize(copy);
    for (auto* v : {&load_done, &attn_done, &append_done, &t_load_start, &t_load_end, &t_wait_arrive, &t_wait_pass}) {
      for (cudaEvent_t e : *v) cudaEventDestroy(e);
    }
    for (cudaEvent_t e : {copy_mark, compute_mark, tables_ready, select_mark, select_done}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (PinnedStaging* s : {&table_staging, &sets_staging, &slots_staging, &copy_staging, &select_pinned}) {
      if (s->ready != nullptr) cudaEventDestroy(s->ready);
      if (s->host != nullptr) cudaFreeHost(s->host);
    }
    if (copy != nullptr) cudaStreamDestroy(copy);
  }
};

// Copies `bytes` from `src` through pinned `staging` to device `dst` on `stream` (waits for the
// previous copy out of the staging buffer first).
absl::Status StagedUpload(PinnedStaging& staging, const void* src, size_t bytes, void* dst, cudaStream_t stream);
// The same in two halves, for callers that write the bytes into the staging buffer themselves (no host
// copy in between): Reserve waits for the previous copy out of `staging`, grows it to `bytes` and returns
// its host pointer; Commit queues the copy of its first `bytes` to `dst` on `stream`.
absl::StatusOr<char*> StagingReserve(PinnedStaging& staging, size_t bytes);
// Grows `staging`'s host buffer to at least `bytes` (doubling; its previous copies must be complete).
absl::Status GrowPinned(PinnedStaging& staging, size_t bytes);
absl::Status StagingCommit(PinnedStaging& staging, size_t bytes, void* dst, cudaStream_t stream);

// Grows `buf` to at least `bytes`, allocated as `kind`. Buffers the copy stream reads use kPrefetch, not
// kWorkspace: a released workspace block is handed out again at once, ordered only on the compute stream.
absl::Status EnsureDeviceBuffer(CudaMemory& memory, Tensor* buf, size_t bytes, MemoryKind kind);
// What EnsureDeviceBuffer allocates for a request of `bytes` a buffer of `held` bytes (0: none) does not cover:
// at least 4 KiB, and at least twice what it held (so that a buffer growing step by step reallocates rarely).
size_t GrownBufferBytes(size_t held, size_t bytes);
// The most a buffer EnsureDeviceBuffer grows holds while no request exceeds `most` bytes, before the allocator's
// rounding: the doubling can leave it just under twice the largest request. For the memory planner's bounds.
size_t GrownBufferBoundBytes(size_t most);
// One load_done, attn_done and append_done event per layer, created when the layer count is first seen.
absl::Status EnsureLayerEvents(CudaBackend::SparseState* sp, int n_layers);
// Copy timing (cuda_sparse.cc). RecordLoadStart/End bracket a layer's gather on the copy stream; before
// that, ReadLoadTiming adds the layer's previous timed load (complete by then: the host synchronised on
// the previous step's logits) to `counters`. WaitForElasticLoad is the compute stream's wait on
// load_done[layer], bracketed by the arrival/pass events whose distance is the exposed copy time.
absl::Status ReadLoadTiming(CudaBackend::SparseState* sp, int layer, ElasticCounters* counters);
absl::Status RecordLoadStart(CudaBackend::SparseState* sp, int layer);
absl::Status RecordLoadEnd(CudaBackend::SparseState* sp, int layer, int32_t layers);
// Under stream capture (`capturing`) the wait and its timing events become graph nodes waiting on / recording
// the events at every replay, and the layer goes into sp->capture_waits (MarkWaitTimed after each launch).
absl::Status WaitForElasticLoad(CudaBackend::SparseState* sp, cudaStream_t compute, int layer, bool capturing);
void MarkWaitTimed(CudaBackend::SparseState* sp, int layer);
// cudaEventRecord; under capture an event record node, so that the event fires at every replay.
inline cudaError_t RecordEvent(cudaEvent_t e, cudaStream_t s, bool capturing) {
  return capturing ? cudaEventRecordWithFlags(e, s, cudaEventRecordExternal) : cudaEventRecord(e, s);
}
// Every sequence of `batch` must have `layer` in the same tier (offloaded: with host copy and slot buffers).
absl::Status CheckSparseTier(const BatchDesc& batch, int layer, bool offloaded, const char* op);
// t is bf16 on the GPU with shape [d0, d1, d2].
absl::Status CheckSparseBf16(const Tensor& t, const char* what, int64_t d0, int64_t d1, int64_t d2);

}  // namespace specontext::cuda
