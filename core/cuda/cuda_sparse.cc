// CudaBackend: KV tiers and sparse decode (backend.h "KV tiers and sparse decode"; DESIGN.md §1, §4).
//
// Streams and ordering. Elastic loads run on a dedicated copy stream:
//   KvAppendHost(l)      compute: append kernel writing the mapped pinned host rows; records append_done[l]
//   ElasticLoad(l)       copy waits attn_done[l] (the previous step's SparseAttention(l) read the slots it
//                        overwrites) and append_done[l]; gather kernel; records load_done[l]. ElasticLoadLayers
//                        gathers the offloaded layers of one host layer group (SequenceKv "Host layout") in
//                        one kernel after the waits of all of them, then records each one's load_done
//   SparseAttention(l)   compute waits load_done[l] only (offloaded layers); records attn_done[l]
//   Attention(l)         (a batch with prefill tokens) compute: bulk copies of the host rows [0, past + n) into a
//                        device staging buffer, then the tiles over the copy (cuda_prefill_staging.cc)
// Per-(layer, sequence) pointer tables (where attention reads K/V, where the gather reads and writes) are
// uploaded once per batch; the index sets once per step; a copy list once per distinct list (every
// offloaded layer of a step shares one list, so it is uploaded once per step: within one
// PrepareSparseDecode, the list object passed again is taken as unchanged without comparing its rows).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

absl::Status NewEvent(cudaEvent_t* e) {
  RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  return absl::OkStatus();
}


}  // namespace

// Every sequence must have `layer` in the same tier (the planner moves layers for all sequences).
absl::Status CheckSparseTier(const BatchDesc& batch, int layer, bool offloaded, const char* op) {
  for (size_t i = 0; i < batch.kv.size(); ++i) {
    const SequenceKv* kv = batch.kv[i];
    if (kv->offloaded(layer) != offloaded) {
      return absl::FailedPreconditionError(absl::StrCat(op, ": layer ", layer, " of sequence ", i, " is ",
                                                        offloaded ? "not offloaded" : "offloaded"));
    }
    if (!offloaded) continue;
    if (layer >= static_cast<int>(kv->slot_k.size()) || layer >= static_cast<int>(kv->slot_v.size()) ||
        layer >= static_cast<int>(kv->host_v.size()) || kv->slot_k[layer].empty() || kv->slot_v[layer].empty() ||
        kv->host_v[layer].empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat(op, ": offloaded layer ", layer, " of sequence ", i, " has no slot buffer"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSparseBf16(const Tensor& t, const char* what, int64_t d0, int64_t d1, int64_t d2) {
  if (t.empty() || t.dtype() != DType::kBF16 || t.device() != DeviceKind::kCuda || t.ndim() != 3 ||
      t.dim(0) != d0 || t.dim(1) != d1 || t.dim(2) != d2) {
    return absl::InvalidArgumentError(absl::StrCat("sparse attention: ", what, " must be bf16@cuda [", d0, ", ", d1,
                                                   ", ", d2, "], got ", t.DebugString()));
  }
  return absl::OkStatus();
}

size_t GrownBufferBytes(size_t held, size_t bytes) { return std::max(bytes, held == 0 ? size_t{4096} : held * 2); }

// A growth from `held` < request <= most gives max(request, 4096, 2 * held) <= max(4096, 2 * most).
size_t GrownBufferBoundBytes(size_t most) { return std::max(size_t{4096}, 2 * most); }

absl::Status EnsureDeviceBuffer(CudaMemory& memory, Tensor* buf, size_t bytes, MemoryKind kind) {
  if (!buf->empty() && buf->nbytes() >= bytes) return absl::OkStatus();
  const size_t grown = GrownBufferBytes(buf->empty() ? 0 : buf->nbytes(), bytes);
  *buf = Tensor();  // a kPrefetch block is freed with cudaFree, which waits for the device first
  ASSIGN_OR_RETURN(*buf, memory.Alloc(DType::kU8, {static_cast<int64_t>(grown)}, kind));
  return absl::OkStatus();
}

absl::Status GrowPinned(PinnedStaging& staging, size_t bytes) {
  if (staging.bytes >= bytes) return absl::OkStatus();
  const size_t grown = std::max(bytes, staging.bytes * 2);
  if (staging.host != nullptr) RETURN_IF_CUDA_ERROR(cudaFreeHost(staging.host));
  staging.host = nullptr;
  staging.bytes = 0;
  RETURN_IF_CUDA_ERROR(cudaHostAlloc(&staging.host, grown, cudaHostAllocDefault));
  staging.bytes = grown;
  return absl::OkStatus();
}

absl::StatusOr<char*> StagingReserve(PinnedStaging& staging, size_t bytes) {
  // The previous copy out of this staging buffer must be done before it is rewritten.
  RETURN_IF_CUDA_ERROR(cudaEventSynchronize(staging.ready));
  RETURN_IF_ERROR(GrowPinned(staging, bytes));
  return static_cast<char*>(staging.host);
}

absl::Status StagingCommit(PinnedStaging& staging, size_t bytes, void* dst, cudaStream_t stream) {
  if (bytes == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dst, staging.host, bytes, cudaMemcpyHostToDevice, stream));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(staging.ready, stream));
  return absl::OkStatus();
}

absl::Status StagedUpload(PinnedStaging& staging, const void* src, size_t bytes, void* dst, cudaStream_t stream) {
  if (bytes == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(char* host, StagingReserve(staging, bytes));
  std::memcpy(host, src, bytes);
  return StagingCommit(staging, bytes, dst, stream);
}

absl::StatusOr<CudaBackend::SparseState*> CudaBackend::Sparse() {
  if (sparse_ != nullptr) return sparse_.get();
  auto s = std::make_shared<SparseState>();
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  int least = 0, greatest = 0;
  RETURN_IF_CUDA_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  RETURN_IF_CUDA_ERROR(cudaStreamCreateWithPriority(&s->copy, cudaStreamNonBlocking, least));
  RETURN_IF_ERROR(NewEvent(&s->copy_mark));
  RETURN_IF_ERROR(NewEvent(&s->compute_mark));
  RETURN_IF_ERROR(NewEvent(&s->tables_ready));
  RETURN_IF_ERROR(NewEvent(&s->select_mark));
  RETURN_IF_ERROR(NewEvent(&s->select_done));
  for (PinnedStaging* st : {&s->table_staging, &s->sets_staging, &s->slots_staging, &s->copy_staging}) {
    RETURN_IF_ERROR(NewEvent(&st->ready));
  }
  sparse_ = std::move(s);
  return sparse_.get();
}

absl::Status CudaBackend::SyncCopyStream() {
  if (sparse_ == nullptr) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(sparse_->copy));
  return absl::OkStatus();
}

// ---- pinned host memory ------------------------------------------------------------------------

absl::StatusOr<Tensor> CudaBackend::AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) {
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("AllocPinnedHost: negative dimension in ", ShapeToString(shape)));
  }
  if (kind == MemoryKind::kCount) return absl::InvalidArgumentError("AllocPinnedHost: kCount is not a memory kind");
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  const int64_t bytes = std::max<int64_t>(256, NumElements(shape) * static_cast<int64_t>(DTypeSize(dtype)));
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  // Host KV blocks (>= 2 MiB) on transparent huge pages: the gather reads them no faster, but pinning them
  // was 1.8-4.4 GB/s against 1.3-2.1 for cudaHostAlloc on the H100 machine (2026-11-24, cuda_gather_bench
  // --section footprint), which is the start-up of a host tier of tens of GB. Anything else, or where THP
  // is off: cudaHostAlloc. Both map the block with the device pointer equal to the host pointer.
  const HostPinMode mode = kind == MemoryKind::kKvCache && bytes >= (int64_t{2} << 20) ? HostPinMode::kTransparentHuge
                                                                                        : HostPinMode::kCudaHostAlloc;
  absl::StatusOr<MappedHostBlock> block = AllocMappedHostOrFallback(options_.device, static_cast<size_t>(bytes), mode);
  if (!block.ok()) {
    return absl::Status(block.status().code(), absl::StrCat("AllocPinnedHost of ", bytes, " bytes (",
                                                            std::string(MemoryKindName(kind)), "): ",
                                                            block.status().message()));
  }
  void* p = block->ptr;
  std::shared_ptr<HostCounters> c = sp->host;
  c->bytes[static_cast<size_t>(kind)].fetch_add(bytes);
  const int64_t total = c->total.fetch_add(bytes) + bytes;
  int64_t peak = c->peak.load();
  while (total > peak && !c->peak.compare_exchange_weak(peak, total)) {
  }
  std::shared_ptr<void> storage(p, [c, kind, bytes, b = *block](void*) {
    FreeMappedHost(b);
    c->bytes[static_cast<size_t>(kind)].fetch_sub(bytes);
    c->total.fetch_sub(bytes);
  });
  return Tensor(p, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
}

MemoryReport CudaBackend::host_memory_report() const {
  MemoryReport r;
  if (sparse_ == nullptr) return r;
  const HostCounters& c = *sparse_->host;
  for (size_t i = 0; i < r.bytes.size(); ++i) r.bytes[i] = c.bytes[i].load();
  r.total = c.total.load();
  r.peak = c.peak.load();
  return r;
}

absl::Status CudaBackend::CopyToPinnedHost(const Tensor& device, Tensor* host) {
  if (host == nullptr || host->empty() || device.dtype() != host->dtype() || device.numel() != host->numel() ||
      device.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("CopyToPinnedHost: ", device.DebugString(), " into ",
                                                   host == nullptr ? std::string("null") : host->DebugString()));
  }
  // Earlier appends to this host tensor (copy stream) come first, then the compute stream's work.
  RETURN_IF_ERROR(SyncCopyStream());
  if (device.nbytes() > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host->data(), device.data(), device.nbytes(), cudaMemcpyDefault, stream_));
  }
  return SyncAndCheck();
}

absl::Status CudaBackend::KvAppendHost(int layer, const Tensor& k, const Tensor& v) {
  if (!batch_valid_) return absl::FailedPreconditionError("kv_append_host: PrepareBatch was not called");
  if (layer < 0 || layer >= n_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("kv_append_host: layer ", layer, " out of range"));
  }
  RETURN_IF_ERROR(CheckSparseTier(batch_, layer, /*offloaded=*/true, "kv_append_host"));
  for (size_t i = 0; i < batch_.kv.size(); ++i) {
    const SequenceKv* kv = batch_.kv[i];
    if (kv->k[layer].data() != kv->host_k[layer].data() || kv->v[layer].data() != kv->host_v[layer].data()) {
      return absl::FailedPreconditionError(
          absl::StrCat("kv_append_host: k/v of offloaded layer ", layer, " do not alias the host copy"));
    }
  }
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  RETURN_IF_ERROR(EnsureLayerEvents(sp, n_layers_));
  // The append kernel writes the mapped host rows directly (k/v[layer] alias host_k/v, so the batch
  // metadata already holds those pointers), on the compute stream: a dense attention of a prefill chunk
  // reads those rows next, and the model reuses the k/v workspace right after, so an append on another
  // stream would have to be waited for at once anyway. At decode it moves n_seqs x n_kv x 2 rows (a few
  // microseconds). Loads of this layer on the copy stream wait for it through append_done.
  RETURN_IF_ERROR(KvAppend(layer, k, v));
  RETURN_IF_CUDA_ERROR(RecordEvent(sp->append_done[layer], stream_, capturing_));
  return absl::OkStatus();
}

// ---- tables and index sets --------------------------------------------------------------------

namespace {
int64_t RowsOf(const Tensor& t) { return t.ndim() == 3 || IsKvPair(t) ? t.dim(1) : -1; }
}  // namespace

absl::Status CudaBackend::EnsureTierTables(int layer) {
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  const int n_seqs = static_cast<int>(batch_.kv.size());
  bool fresh = sp->tab_kv == batch_.kv && static_cast<int>(sp->attn_tab.size()) == n_layers_ * n_seqs;
  for (int i = 0; fresh && i < n_seqs; ++i) {
    const SequenceKv* kv = batch_.kv[i];
    const bool off = kv->offloaded(layer);
    const SparseKvPtrs& a = sp->attn_tab[size_t(layer) * n_seqs + i];
    const ElasticSeqPtrs& e = sp->elastic_tab[size_t(layer) * n_seqs + i];
    // Rows too, not only addresses: cached pinned blocks and device memory come back at the same addresses
    // for other sequences of other capacities.
    fresh = off ? (a.k == kv->slot_k[layer].data() && e.host_k == kv->host_k[layer].data() &&
                   e.slot_v == kv->slot_v[layer].data() &&
                   e.host_v == KvRowsOf(kv->host_k[layer], kv->host_v[layer]).v &&
                   e.capacity == RowsOf(kv->host_k[layer]) && e.slots == RowsOf(kv->slot_k[layer]) &&
                   a.rows == RowsOf(kv->slot_k[layer]))
                : (a.k == kv->k[layer].data() && a.v == kv->v[layer].data() && a.rows == RowsOf(kv->k[layer]));
  }
  if (fresh) return absl::OkStatus();
  sp->attn_tab.assign(size_t(n_layers_) * n_seqs, SparseKvPtrs{});
  sp->elastic_tab.assign(size_t(n_layers_) * n_seqs, ElasticSeqPtrs{});
  for (int l = 0; l < n_layers_; ++l) {
    for (int i = 0; i < n_seqs; ++i) {
      const SequenceKv* kv = batch_.kv[i];
      SparseKvPtrs& a = sp->attn_tab[size_t(l) * n_seqs + i];
      if (!kv->offloaded(l)) {
        a = {kv->k[l].data(), kv->v[l].data(), kv->k[l].dim(1)};  // rows: a resident layer may hold fewer than capacity
        continue;
      }
      if (static_cast<int>(kv->slot_k.size()) <= l || kv->slot_k[l].empty() || kv->slot_v[l].empty() ||
          kv->host_v.size() <= size_t(l) || kv->host_v[l].empty()) {
        continue;  // reported by CheckTier when the layer is used
      }
      const Tensor &hk = kv->host_k[l], &sk = kv->slot_k[l];
      // The host copy: plain [n_kv, rows, hd] K and V, or one interleaved pair (host_k and host_v the same tensor).
      const bool pair = IsKvPair(hk) && kv->host_v[l].data() == hk.data() && kv->host_v[l].shape() == hk.shape();
      const KvRowsView hr = KvRowsOf(hk, kv->host_v[l]);
      for (const Tensor* t : {&hk, &kv->host_v[l], &sk, &kv->slot_v[l]}) {
        const bool host_pair = pair && (t == &hk || t == &kv->host_v[l]);
        if (t->dtype() != DType::kBF16 || t->device() != DeviceKind::kCuda || (!host_pair && t->ndim() != 3) ||
            t->dim(0) != n_kv_ || (host_pair ? hr.head_dim : t->dim(2)) != head_dim_) {
          return absl::InvalidArgumentError(absl::StrCat("kv tiers: sequence ", i, " layer ", l, " tensor ",
                                                         t->DebugString(), ", expected bf16@cuda [", n_kv_,
                                                         ", rows, ", head_dim_, "] (host: or one [.., 2, ..] pair)"));
        }
      }
      if (kv->host_v[l].dim(1) != hk.dim(1) || kv->slot_v[l].dim(1) != sk.dim(1)) {
        return absl::InvalidArgumentError(absl::StrCat("kv tiers: sequence ", i, " layer ", l, " K/V rows differ"));
      }
      a = {sk.data(), kv->slot_v[l].data(), sk.dim(1)};
      sp->elastic_tab[size_t(l) * n_seqs + i] = {hr.k, hr.v, sk.data(), kv->slot_v[l].data(), hk.dim(1), sk.dim(1),
                                                 hr.stride * static_cast<int64_t>(sizeof(uint16_t))};
    }
  }
  sp->tab_kv = batch_.kv;
  const size_t attn_bytes = sizeof(SparseKvPtrs) * sp->attn_tab.size();
  const TierTablesLayout lay = TierTablesLayoutOf(n_layers_, n_seqs);
  sp->off_elastic = lay.off_elastic;
  const size_t total = lay.total;
  std::vector<char> host(total, 0);
  std::memcpy(host.data(), sp->attn_tab.data(), attn_bytes);
  std::memcpy(host.data() + sp->off_elastic, sp->elastic_tab.data(), sizeof(ElasticSeqPtrs) * sp->elastic_tab.size());
  // Loads of the copy stream may still read the old tables: order the rewrite after them.
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->copy_mark, sp->copy));
  RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(stream_, sp->copy_mark, 0));
  RETURN_IF_ERROR(EnsureDeviceBuffer(*memory_, &sp->tables, total, MemoryKind::kPrefetch));
  RETURN_IF_ERROR(StagedUpload(sp->table_staging, host.data(), total, sp->tables.data(), stream_));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->tables_ready, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::PrepareSparseDecode(const SparseDecodeDesc& desc) {
  ASSIGN_OR_RETURN(SparseState * sp, Sparse());
  sp->sets_valid = false;
  ++sp->decode_epoch;
  if (!batch_valid_) return absl::FailedPreconditionError("sparse decode: PrepareBatch was not called");
  RETURN_IF_ERROR(ValidateSparseDecode(desc, batch_));
  const IndexSets& sets = *desc.sets;
  const int n_seqs = static_cast<int>(batch_.seqs.size());
  if (sets.n_kv_heads != n_kv_) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse decode: index sets for ", sets.n_kv_heads, " KV heads, the model has ", n_kv_));
  }
  const size_t n_ptr = sets.indptr.size(), n_idx = sets.indices.size();
  const bool has_slots = !desc.slots.empty();
  const bool on_device = desc.positions_on_device;
  const bool has_dense =
      std::find(desc.dense_resident.begin(), desc.dense_resident.end(), 1) != desc.dense_resident.end();
  if (has_dense && on_device) {
    // The flags go up with the layout of a host upload; the weak-retrieval fallback waits for its sets anyway.
    return absl::InvalidArgumentError("sparse decode: dense_resident needs the positions on the host");
  }
  size_t total = 0;
  if (on_device) {
    // The started selection wrote the positions into sets_buf (sized by it): keep them, use its layout.
    const SelectLayout& lay = sp->select_layout;
    if (!lay.valid || lay.n_ptr != n_ptr || lay.n_idx != n_idx) {
      return absl::FailedPreconditionError(
          "sparse decode: positions_on_device, but the last started selection is not these sets'");
    }
    sp->off_pos = lay.off_pos;
    sp->off_slots = lay.off_slots;
  } else {
    sp->select_layout.valid = false;  // the upload below replaces the selection's positions
    sp->indptr_select = 0;
    const SetsUploadLayout lay = SetsUploadLayoutOf(n_ptr, n_idx, has_slots, has_dense, n_seqs);
    sp->off_pos = lay.off_pos;
    sp->off_slots = lay.off_slots;
    if (has_dense) sp->off_dense = lay.off_dense;
    total = lay.total;
  }
  // [indptr][positions][slots] straight into the pinned staging buffer (one pass over each array; the
  // slots are range-checked while they are copied). With the positions on the device only the layout goes up,
  // once per started selection: a second call of the step (the deferred plan's, with the slots) leaves it, so
  // that nothing runs on the compute stream between the two graphs.
  const bool upload_layout = !on_device || sp->indptr_select != sp->select_epoch;
  char* host = nullptr;
  if (upload_layout) {
    ASSIGN_OR_RETURN(host, StagingReserve(sp->sets_staging, on_device ? sizeof(int32_t) * n_ptr : total));
    std::memcpy(host, sets.indptr.data(), sizeof(int32_t) * n_ptr);
    if (n_idx > 0 && !on_device) std::memcpy(host + sp->off_pos, sets.indices.data(), sizeof(int32_t) * n_idx);
    if (has_dense) {
      int32_t* dense_len = reinterpret_cast<int32_t*>(host + sp->off_dense);
      for (int i = 0; i < n_seqs; ++i) dense_len[i] = desc.dense_resident[i] != 0 ? sets.seq_len[i] : -1;
    }
  }
  // Slots index every offloaded layer's slot buffer: check them against the smallest of the sequence's.
  // With the positions on the device (the deferred selection: this call comes once the resident layers are
  // enqueued) they go up on the copy stream from their own staging buffer, so that the compute stream does not
  // run the upload between the resident layers and the offloaded ones.
  const bool slots_on_copy = on_device && has_slots && n_idx > 0;
  int32_t* slots_out = nullptr;
  if (slots_on_copy) {
    ASSIGN_OR_RETURN(char* slots_host, StagingReserve(sp->slots_staging, sizeof(int32_t) * n_idx));
    slots_out = reinterpret_cast<int32_t*>(slots_host);
  } else if (!on_device) {
    slots_out = reinterpret_cast<int32_t*>(host + sp->off_slots);
  }
  for (int i = 0; i < n_seqs && has_slots && slots_out != nullptr; ++i) {
    const SequenceKv* kv = batch_.kv[i];
    int64_t rows = -1;
    for (size_t l = 0; l < kv->slot_k.size(); ++l) {
      if (kv->offloaded(static_cast<int>(l)) && !kv->slot_k[l].empty()) {
        rows = rows < 0 ? kv->slot_k[l].dim(1) : std::min(rows, kv->slot_k[l].dim(1));
      }
    }
    const int32_t b = sets.indptr[i * sets.sets_per_seq], e = sets.indptr[(i + 1) * sets.sets_per_seq];
    const int32_t* in = desc.slots.data();
    uint32_t hi = 0;  // unsigned: a negative slot compares as huge
    for (int32_t j = b; j < e; ++j) {
      slots_out[j] = in[j];
      hi = std::max(hi, static_cast<uint32_t>(in[j]));
    }
    if (rows < 0 || e == b || hi < static_cast<uint64_t>(rows)) continue;
    for (int32_t j = b; j < e; ++j) {
      if (in[j] < 0 || in[j] >= rows) {
        return absl::InvalidArgumentError(absl::StrCat("sparse decode: sequence ", i, " slot ", in[j],
                                                       " outside its ", rows, " slot rows"));
      }
    }
  }
  if (on_device) {
    // Only the layout and the slots go up (StartSelectIndexSets ordered the buffer after the copy stream).
    char* dev = static_cast<char*>(sp->sets_buf.data());
    if (upload_layout) {
      RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dev, host, sizeof(int32_t) * n_ptr, cudaMemcpyHostToDevice, stream_));
      RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->sets_staging.ready, stream_));
      sp->indptr_select = sp->select_epoch;
    }
    if (slots_on_copy) {
      // After the previous step's attention of every offloaded layer (it read the old slots); then each such
      // layer's load_done stands behind the upload (its loads, enqueued next, record it again), so an offloaded
      // layer's attention, which waits for load_done, reads this step's slots even with nothing to load.
      RETURN_IF_ERROR(EnsureLayerEvents(sp, n_layers_));
      std::vector<bool> offloaded(n_layers_, false);
      for (const SequenceKv* kv : batch_.kv) {
        for (int l = 0; l < n_layers_; ++l) offloaded[l] = offloaded[l] || kv->offloaded(l);
      }
      for (int l = 0; l < n_layers_; ++l) {
        if (offloaded[l]) RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(sp->copy, sp->attn_done[l], 0));
      }
      RETURN_IF_ERROR(StagingCommit(sp->slots_staging, sizeof(int32_t) * n_idx, dev + sp->off_slots, sp->copy));
      for (int l = 0; l < n_layers_; ++l) {
        if (offloaded[l]) RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->load_done[l], sp->copy));
      }
    }
  } else {
    // The previous step's loads are done by now (its attention waited on them); order after them anyway.
    RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->copy_mark, sp->copy));
    RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(stream_, sp->copy_mark, 0));
    RETURN_IF_ERROR(EnsureBuffer(&sp->sets_buf, total));
    RETURN_IF_ERROR(StagingCommit(sp->sets_staging, total, sp->sets_buf.data(), stream_));
  }
  sp->n_seqs = n_seqs;
  sp->sets_per_seq = sets.sets_per_seq;
  sp->host_indptr.assign(sets.indptr.begin(), sets.indptr.end());
  sp->has_slots = has_slots;
  sp->sum_keys = 0;
  sp->max_keys = 0;
  sp->has_dense = has_dense;
  sp->dense_sum_keys = 0;
  sp->dense_max_keys = 0;
  constexpr int kQuantum = SparseState::kDensePlanKeys;
  for (int i = 0; i < n_seqs; ++i) {
    const bool dense = has_dense && desc.dense_resident[i] != 0;
    const int dense_keys = (sets.seq_len[i] + 1 + kQuantum - 1) / kQuantum * kQuantum;
    for (int g = 0; g < n_kv_; ++g) {
      const int32_t s = sets.SetIndex(i, g);
      const int keys = sets.indptr[s + 1] - sets.indptr[s] + 1;
      sp->sum_keys += keys;
      sp->max_keys = std::max(sp->max_keys, keys);
      sp->dense_sum_keys += dense ? dense_keys : keys;
      sp->dense_max_keys = std::max(sp->dense_max_keys, dense ? dense_keys : keys);
    }
  }
  sp->sets_valid = true;
  return EnsureTierTables(0);
}

// ---- copy time hidden vs exposed -----------------------------------------------------------------

namespace {

constexpr uint8_t kLoadTimed = 1, kWaitTimed = 2;

absl::Status EnsureTimingEvents(CudaBackend::SparseState* sp, int layer) {
  const size_t n = static_cast<size_t>(layer) + 1;
  for (auto* v : {&sp->t_load_start, &sp->t_load_end, &sp->t_wait_arrive, &sp->t_wait_pass}) {
    while (v->size() < n) {
      cudaEvent_t e = nullptr;
      RETURN_IF_CUDA_ERROR(cudaEventCreate(&e));  // timing enabled
      v->push_back(e);
    }
  }
  if (sp->timing.size() < n) sp->timing.resize(n, 0);
  if (sp->timed_layers.size() < n) sp->timed_layers.resize(n, 0);
  return absl::OkStatus();
}

// Milliseconds from `a` to `b` when both completed; nullopt otherwise (clearing the not-ready error so
// that a later cudaGetLastError after a launch does not report it).
std::optional<float> ElapsedMs(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  if (cudaEventElapsedTime(&ms, a, b) != cudaSuccess) {
    cudaGetLastError();
    return std::nullopt;
  }
  return ms;
}

}  // namespace

absl::Status ReadLoadTiming(CudaBackend::SparseState* sp, int layer, ElasticCounters* counters) {
  RETURN_IF_ERROR(EnsureTimingEvents(sp, layer));
  const uint8_t t = sp->timing[layer];
  sp->timing[layer] = 0;
  if (counters == nullptr || t != (kLoadTimed | kWaitTimed)) return absl::OkStatus();
  const std::optional<float> dur = ElapsedMs(sp->t_load_start[layer], sp->t_load_end[layer]);
  const std::optional<float> wait = ElapsedMs(sp->t_wait_arrive[layer], sp->t_wait_pass[layer]);
  if (!dur.has_value() || !wait.has_value()) return absl::OkStatus();  // not complete: the sample is dropped
  // The wait also covers copy-stream work queued ahead of this load (the copy list upload before the
  // first load of a step): all of it is copy time the compute stream did not hide.
  counters->copy_timed_loads += sp->timed_layers[layer];
  counters->copy_seconds += std::max(0.0f, *dur) * 1e-3;
  counters->copy_exposed_seconds += std::max(0.0f, *wait) * 1e-3;
  return absl::OkStatus();
}

absl::Status RecordLoadStart(CudaBackend::SparseState* sp, int layer) {
  RETURN_IF_ERROR(EnsureTimingEvents(sp, layer));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->t_load_start[layer], sp->copy));
  return absl::OkStatus();
}

absl::Status RecordLoadEnd(CudaBackend::SparseState* sp, int layer, int32_t layers) {
  RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->t_load_end[layer], sp->copy));
  sp->timing[layer] = kLoadTimed;
  sp->timed_layers[layer] = layers;
  return absl::OkStatus();
}

absl::Status WaitForElasticLoad(CudaBackend::SparseState* sp, cudaStream_t compute, int layer, bool capturing) {
  RETURN_IF_ERROR(EnsureTimingEvents(sp, layer));
  if (capturing) {
    // A step graph waits on the load the host enqueues before each replay (an external wait node), and
    // times every replay's wait; MarkWaitTimed after the launch pairs it with that step's timed load.
    RETURN_IF_CUDA_ERROR(RecordEvent(sp->t_wait_arrive[layer], compute, true));
    RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(compute, sp->load_done[layer], cudaEventWaitExternal));
    RETURN_IF_CUDA_ERROR(RecordEvent(sp->t_wait_pass[layer], compute, true));
    sp->capture_waits.push_back(layer);
    return absl::OkStatus();
  }
  const bool timed = sp->timing[layer] == kLoadTimed;
  if (timed) RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->t_wait_arrive[layer], compute));
  RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(compute, sp->load_done[layer], 0));
  if (timed) {
    RETURN_IF_CUDA_ERROR(cudaEventRecord(sp->t_wait_pass[layer], compute));
    sp->timing[layer] |= kWaitTimed;
  }
  return absl::OkStatus();
}

void MarkWaitTimed(CudaBackend::SparseState* sp, int layer) {
  if (layer < static_cast<int>(sp->timing.size()) && sp->timing[layer] == kLoadTimed) sp->timing[layer] |= kWaitTimed;
}

}  // namespace specontext::cuda
