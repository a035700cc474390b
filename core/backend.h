// The backend interface: memory, copies and the ops the model code is written against.
// Model code never includes CUDA headers; the CPU backend is the reference every other backend is
// tested against (tests/backend_ops_test.cc style).
//
// Threading: a backend instance is used by one thread at a time. Ops are enqueued in order on the
// backend's compute stream; results are visible to the host after Synchronize() or ToHost().
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/tensor.h"

namespace specontext {

struct IndexSets;      // core/sparse/index_sets.h
struct CopyList;       // core/sparse/elastic.h
struct ElasticCounters;
struct SelectionQuery;    // core/sparse/selection.h
struct SelectionOptions;
struct SelectionResult;
struct LayerSelectionSpec;  // core/sparse/selection_source.h

// Where device memory goes; every allocation is tagged and accounted (see MemoryReport).
enum class MemoryKind : uint8_t {
  kWeights,
  kKvCache,
  kWorkspace,
  kGraphs,
  kRetrieval,
  kPrefetch,
  kOther,
  kCount
};
std::string_view MemoryKindName(MemoryKind kind);

struct MemoryReport {
  std::array<int64_t, static_cast<size_t>(MemoryKind::kCount)> bytes{};  // live bytes per kind
  int64_t total = 0;                                                      // sum of bytes
  int64_t peak = 0;                                                       // highest total seen
  int64_t limit = 0;                                                      // 0 = no limit
  // Highest live bytes seen per kind (each kind's own maximum; they need not coincide in time). Zeros on a
  // backend that does not track them.
  std::array<int64_t, static_cast<size_t>(MemoryKind::kCount)> peak_bytes{};
};

// The most bytes a backend allocation of `bytes` takes from the memory limit on any backend: the CPU rounds
// up to 64 bytes, CUDA to 256 and, for workspace above 64 KiB, to a size class at most 1/16 larger
// (core/cuda/cuda_memory.cc WorkspaceBytes). For bounds of transient bytes (the memory planner's step
// workspace) that must hold on every backend.
inline int64_t AllocationBoundBytes(int64_t bytes) {
  const int64_t rounded = std::max<int64_t>(256, (bytes + 255) / 256 * 256);
  return rounded <= (int64_t{64} << 10) ? rounded : rounded + (rounded + 15) / 16;
}

// The steps a bound of the backend's attention buffers covers (Backend::AttentionWorkspaceBytes): any batch of
// at most `max_seqs` sequences and `max_tokens` new tokens over a model of these dimensions and, when `budget`
// > 0, the sparse decode of such batches with index sets of at most `budget` positions over sequences of at
// most `max_context` positions.
struct AttentionWorkspaceShape {
  int32_t max_seqs = 1;    // sequences of one step (prompt chunks and decoding rows together)
  int32_t max_tokens = 1;  // new tokens of one step, all sequences together
  int32_t n_layers = 0;
  int32_t n_heads = 0;     // query heads of the model
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  // Sparse decode (Backend::PrepareSparseDecode, SparseAttention, StartSelectIndexSets); 0: dense attention only.
  int32_t budget = 0;
  int32_t max_context = 0;    // positions of the longest sequence
  int32_t sets_per_seq = 1;   // index sets per sequence (n_kv_heads: head-level; 1: batch-level)
  int32_t select_q_heads = 0;  // query heads of the selection (its captured mass per head); 0: n_heads
  // SparseDecodeDesc::dense_resident may flag sequences (the weak-retrieval fallback): their resident layers
  // attend to the whole past.
  bool dense_fallback = false;
};

// One sequence's part of a ragged batch. The new tokens of all sequences are concatenated, in
// order, into the rows of the step's activations.
struct SeqSlice {
  int32_t token_begin = 0;  // first activation row of this sequence
  int32_t n_tokens = 0;     // new tokens this step (a prompt chunk, or 1 when decoding)
  int32_t past_len = 0;     // tokens already in the KV cache before this step
};

class Backend;

// Where the host copies of offloaded layers (SequenceKv::host_k/host_v) come from, when not from
// Backend::AllocPinnedHost: the services' shared-memory kvstore (generator/kvstore_host_tier.h). Used by
// core/model/kv_tiers.h. Called from the engine thread.
class HostKvAllocator {
 public:
  virtual ~HostKvAllocator() = default;
  // An uninitialised host tensor of `dtype` and `shape` ([n_kv_heads, capacity, head_dim]; with
  // interleaved_ok also the interleaved shapes of SequenceKv "Host layout") that `backend`
  // addresses as it does AllocPinnedHost memory (see WrapHostTensor); its storage keeps the memory alive.
  virtual absl::StatusOr<Tensor> Alloc(Backend& backend, DType dtype, const Shape& shape) = 0;
  // Whether its tensors may hold an interleaved host K/V pair (SequenceKv "Host layout": AllocPinnedHost
  // memory); a layout other processes read (the kvstore segment) stays plain.
  virtual bool interleaved_ok() const { return false; }
};

// KV storage of one sequence, allocated by the backend with kind kKvCache.
// k[layer] and v[layer] are [n_kv_heads, capacity, head_dim] in the backend's compute dtype.
//
// KV tiers (sparse decode, DESIGN.md §1 part 3): a layer the memory planner offloaded keeps its full KV in
// pinned host memory, host_k/host_v[layer] [n_kv_heads, capacity, head_dim] (AllocPinnedHost), and a device
// slot buffer slot_k/slot_v[layer] [n_kv_heads, budget, head_dim] (kind kPrefetch) holding the rows of the
// current index sets at the slots of the sequence's SlotMap (core/sparse/elastic.h). For such a layer
// k/v[layer] alias host_k/host_v[layer] (same tensor) so that dense ops of a prefill can still address it
// (on CUDA: pinned memory mapped into the device address space). Empty host_k = every layer resident.
//
// Host layout of an offloaded layer: plain (host_k, host_v two [n_kv_heads, capacity, head_dim] tensors) or
// interleaved, when the backend asks for it (Backend::host_kv_interleaved) and the host tier comes from
// AllocPinnedHost (directly or through an allocator with interleaved_ok): host_k and host_v are then the same [n_kv_heads, capacity, 2, head_dim] tensor, a token's
// K row and V row side by side, so the elastic gather reads two rows per host page it touches (behind the
// device machine's IOMMU the gather rate is set by pages touched: 20.3 -> 28.9 GB/s on the H100, 2026-11-24).
// KvRowsOf gives the addressing of either.
// Layer groups (Backend::host_kv_layer_group G > 1, interleaved only): the offloaded layers of a group share
// one allocation [n_kv_heads, capacity, G, 2, head_dim], a token's K and V rows of G layers side by side, so
// one gather of the group's layers reads G x 2 rows per host page (HostLayerGroupOf in core/model/kv_tiers.h
// gives the groups: counted from the last layer, as layers go to host from the last one backward). Layer j
// of the group holds the view [n_kv_heads, capacity, G, 2, head_dim] whose data() is the allocation + j x 2 x
// head_dim elements (its bytes run past data() + nbytes() - j x 2 x head_dim elements: never copy it whole)
// and whose storage keeps the allocation alive until every layer of the group has left the host.
struct SequenceKv {
  std::vector<Tensor> k;
  std::vector<Tensor> v;
  int32_t capacity = 0;
  std::vector<Tensor> host_k, host_v;  // [n_layers] (or empty); non-empty tensors only for offloaded layers
  std::vector<Tensor> slot_k, slot_v;  // [n_layers] (or empty); non-empty tensors only for offloaded layers
  int32_t slot_budget = 0;             // B: rows per KV head of the slot buffers
  // Where layers moved to host later get host_k/host_v (null: Backend::AllocPinnedHost).
  std::shared_ptr<HostKvAllocator> host_allocator;

  bool offloaded(int layer) const {
    return layer >= 0 && static_cast<size_t>(layer) < host_k.size() && !host_k[layer].empty();
  }
};

// True for an interleaved host K/V tensor (SequenceKv "Host layout"): one layer's [n_kv_heads, rows, 2,
// head_dim], or a layer's view [n_kv_heads, rows, G, 2, head_dim] of a layer group.
inline bool IsKvPair(const Tensor& t) { return (t.ndim() == 4 && t.dim(2) == 2) || (t.ndim() == 5 && t.dim(3) == 2); }

// Where K/V rows of one layer live: K row (h, t) at k + (h * rows + t) * stride elements, V row at v + the
// same. Plain tensors k, v [n_kv, rows, d]: stride d. An interleaved pair (k and v the same
// [n_kv, rows, 2, d] tensor): v = k + d, stride 2d; a layer of a group of G: v = k + d, stride 2Gd.
struct KvRowsView {
  void* k = nullptr;
  void* v = nullptr;
  int64_t heads = 0, rows = 0, head_dim = 0, stride = 0;  // stride in elements
};
inline KvRowsView KvRowsOf(const Tensor& k, const Tensor& v) {
  if (IsKvPair(k)) {
    const int64_t d = k.dim(-1), layers = k.ndim() == 5 ? k.dim(2) : 1;
    return {k.data(), static_cast<char*>(k.data()) + d * static_cast<int64_t>(DTypeSize(k.dtype())), k.dim(0),
            k.dim(1), d, 2 * layers * d};
  }
  if (k.ndim() != 3) return {};
  return {k.data(), v.data(), k.dim(0), k.dim(1), k.dim(2), k.dim(2)};
}

// The sparse part of a decode batch (DESIGN.md §4): every sequence of the prepared BatchDesc decodes exactly
// one token. `sets` are the index sets of the step (core/sparse/index_sets.h CSR layout, one entry per
// sequence of the batch, in order); `slots` is ElasticPlan::slots (parallel to sets->indices) giving the slot
// of each position in the slot buffers of offloaded layers (may be empty when no layer is offloaded).
// Both arrays are host memory; a device backend copies them in PrepareSparseDecode.
struct SparseDecodeDesc {
  const IndexSets* sets = nullptr;
  std::span<const int32_t> slots;
  // The positions are those of the pending selection (Backend::StartSelectIndexSets), already on the
  // device: PrepareSparseDecode uploads the layout (indptr) and the slots only, and `sets->indices` need not
  // hold them yet (the host reads them with FinishSelectIndexSets while the forward runs).
  bool positions_on_device = false;
  // Per-sequence weak-retrieval fallback (SparseOptions::fallback_mass): empty, or [n_seqs] where 1 makes
  // sequence i's SparseAttention in resident layers read every past position [0, seq_len[i]) of its full
  // cache instead of its sets (exact dense attention for that sequence alone); 0 keeps its sets. Offloaded
  // layers read the sets' slot rows for every sequence (their rows come from host: a fallback does not load
  // a whole past). A flag per sequence rather than sets of every past position: the sets stay what the
  // elastic plan and the offloaded layers use, nothing of size past goes up, and the step graph's shape
  // does not depend on which sequences are weak. CUDA: needs the positions on the host (not
  // positions_on_device).
  std::span<const uint8_t> dense_resident;
};

// A ragged batch: its slices and, per slice, the sequence's KV storage.
struct BatchDesc {
  std::vector<SeqSlice> seqs;
  std::vector<const SequenceKv*> kv;  // kv[i] belongs to seqs[i]
  int32_t n_tokens = 0;               // sum of seqs[i].n_tokens
};

// One destination of Backend::ScatterRows: rows [row_begin, row_begin + n_rows) of the source go to
// positions [pos, pos + n_rows) of `dst` [heads, capacity, d] (e.g. a sequence's retrieval K cache, or a
// pool of per-sequence rows viewed as [1, slots, d]).
struct RowScatter {
  Tensor* dst = nullptr;
  int32_t row_begin = 0;
  int32_t n_rows = 0;
  int32_t pos = 0;
};

// Parameters of rotary position embeddings, resolved by the model from config.json.
struct RopeArgs {
  const Tensor* inv_freq = nullptr;  // [head_dim / 2] f32, already scaled (llama3, linear, ...)
  bool interleaved = false;          // pairs (x[2i], x[2i+1]) as in llama2.c; else halves as in HF
  float attention_scaling = 1.0f;    // multiplies cos/sin (YaRN mscale); 1 otherwise
};

// One row of Backend::SampleTokens, with core/model/sampler.h semantics.
struct TokenSampling {
  float temperature = 0.0f;  // 0 (or top_k 1): greedy, lowest id on ties
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // in (0, 1]
  float uniform = 0.0f;      // the row's draw in [0, 1) from the request's seeded generator; unused when greedy
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind device() const = 0;
  virtual std::string name() const = 0;
  // Dtype of activations and KV on this backend (f32 on CPU, bf16 on CUDA).
  virtual DType compute_dtype() const = 0;
  // Dtype a weight matrix stored as `stored` is kept in (Linear and Embedding accept it).
  virtual DType weight_dtype(DType stored) const { return compute_dtype(); }

  // ---- memory -----------------------------------------------------------------------------
  // Allocates an uninitialised device tensor. Fails with ResourceExhausted past the memory limit.
  virtual absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) = 0;
  // Allocates and fills a device tensor from host memory, converting floating dtypes to `dtype`.
  virtual absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) = 0;
  // Copies host -> existing device tensor (same dtype and element count).
  virtual absl::Status CopyToDevice(const Tensor& host, Tensor* device) = 0;
  // Copies device -> existing host tensor (same dtype and element count); waits for the copy.
  virtual absl::Status ToHost(const Tensor& device, Tensor* host) = 0;
  // Copies device -> device (same dtype and element count), ordered on the compute stream.
  virtual absl::Status CopyDevice(const Tensor& src, Tensor* dst) {
    return absl::UnimplementedError("CopyDevice is not implemented by this backend");
  }
  // dst[h, r, :] = src[h, r, :] for every head h and r < rows.  src [heads, Rs, d], dst [heads, Rd, d], same
  // dtype, heads and d, rows <= Rs and Rd; either may be device or pinned host memory of this backend.
  // Ordered on the compute stream (a host reader of dst calls Synchronize first). Re-homes a sequence's KV
  // between tensors of different row counts (growing device KV, moving a layer to host).
  virtual absl::Status CopyHeadRows(const Tensor& src, Tensor* dst, int64_t rows) {
    return absl::UnimplementedError("CopyHeadRows is not implemented by this backend");
  }
  // Rows [0, rows) of every KV head between plain tensors k, v [heads, R, d] (device or pinned host) and an
  // interleaved host pair [heads, C, 2, d] (SequenceKv "Host layout"), rows <= R and C, same dtype: to_pair
  // writes pair from k/v (a layer moving to host), else k/v from pair (back to the device, prefill staging).
  // Ordered on the compute stream like CopyHeadRows.
  virtual absl::Status CopyKvPairRows(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) {
    return absl::UnimplementedError("CopyKvPairRows is not implemented by this backend");
  }
  // dst = src[:, col_begin : col_begin + dst.dim(1)].  src [n, m], dst [n, c], same dtype. Splits
  // the output of a fused projection (QKV, gate/up) into contiguous tensors.
  virtual absl::Status CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
    return absl::UnimplementedError("CopyColumns is not implemented by this backend");
  }
  // dst[:, col_begin : col_begin + src.dim(1)] = src.  src [n, c], dst [n, m], same dtype. The inverse of
  // CopyColumns: builds a concatenation (the EAGLE-3 head's cat(embedding, fused features)).
  virtual absl::Status CopyToColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
    return absl::UnimplementedError("CopyToColumns is not implemented by this backend");
  }
  // For every segment s and row r < s.n_rows: (*s.dst)[h, s.pos + r, :] = src[s.row_begin + r, h, :] for
  // each h.  src [n, heads, d]; each dst [heads, capacity, d], same dtype. Checks rows < n and
  // pos + n_rows <= capacity before writing anything. Ordered on the compute stream (appends the retrieval
  // head's K of a whole ragged batch to the sequences' caches in one launch).
  virtual absl::Status ScatterRows(const Tensor& src, std::span<const RowScatter> segments) {
    return absl::UnimplementedError("ScatterRows is not implemented by this backend");
  }
  // Top-B selection (core/sparse/selection.h SelectTopB contract) of batch[0, n) whose q and k_cache are
  // tensors of this backend; the result is host memory (the elastic planner runs on the host). CPU: the
  // reference SelectTopB; CUDA: the fused score + top-k kernels (core/cuda/selection.h), one host wait.
  virtual absl::Status SelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                                       SelectionResult* out) {
    return absl::UnimplementedError("SelectIndexSets is not implemented by this backend");
  }
  // SelectIndexSets without the host wait: `out`'s layout (seq_len, indptr, the size of indices) is set
  // now; where the backend can, the positions and captured mass stay on the device (`out->pending`) until
  // FinishSelectIndexSets, so that a forward whose SparseDecodeDesc says positions_on_device can start
  // before the host has them. Default: the synchronous SelectIndexSets (nothing pending).
  virtual absl::Status StartSelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                                            SelectionResult* out) {
    return SelectIndexSets(batch, n, options, out);
  }
  // Waits for the positions and captured mass of the pending selection and writes them into `out` (the
  // result StartSelectIndexSets filled); no-op when nothing is pending. InvalidArgument for non-finite
  // scores, as SelectIndexSets.
  virtual absl::Status FinishSelectIndexSets(SelectionResult* out) { return absl::OkStatus(); }
  // The most backend bytes (kWorkspace) one SelectIndexSets / StartSelectIndexSets call allocates for
  // `n_seqs` sequences of up to `max_len` positions, `n_q` query heads, `sets_per_seq` sets of up to
  // `budget` positions each: part of the memory planner's step bound. Derived from the layout the call
  // allocates (CUDA: core/cuda/cuda_selection.cc, one block of scores [n_seqs, n_q, max_len] f32 and more);
  // 0 where the selection's scratch is host memory (CPU).
  virtual int64_t SelectionWorkspaceBytes(int32_t n_seqs, int32_t n_q, int32_t sets_per_seq, int32_t max_len,
                                          int32_t budget) const {
    return 0;
  }
  // The most device bytes (allocation rounding included) the backend's own attention buffers, which it keeps
  // and grows between steps, hold for the steps of `shape`: part of the memory planner's step bound.
  // CUDA (core/cuda/cuda_attention.cc, cuda_sparse_ops.cc, cuda_sparse.cc): the batch metadata and work
  // lists, the split-K partial outputs and LSE of Attention (the host-built plan, the decode-only device
  // plan, the batch-invariant decode's fixed splits) and of SparseAttention (the sets' lists and the
  // weak-retrieval fallback's whole pasts), the sparse step's index-set buffer (kWorkspace) and its per-layer
  // KV tables (kPrefetch), each from
  // the layout function its allocation uses, in the backend's current batch-invariant mode (set_batch_invariant
  // comes first: the runtime sets it before the planner measures). 0 where attention keeps no device buffers
  // (CPU: its scratch is host memory).
  virtual int64_t AttentionWorkspaceBytes(const AttentionWorkspaceShape& shape) const { return 0; }
  // Fills a device tensor with zeros, ordered on the compute stream.
  virtual absl::Status Zero(Tensor* t) { return absl::UnimplementedError("Zero is not implemented by this backend"); }
  virtual absl::Status Synchronize() = 0;
  /// Makes the backend's device current on the calling thread (CUDA: cudaSetDevice; CPU: nothing). The ops do
  /// not select their device: a thread that drives a backend on another device than the thread's current one
  /// (a tensor-parallel rank's thread, a loader on the main thread) calls this before its first op.
  virtual absl::Status MakeCurrent() { return absl::OkStatus(); }
  virtual MemoryReport memory_report() const = 0;
  // Bytes the backend may still allocate (limit or free device memory).
  virtual int64_t available_bytes() const = 0;

  // ---- ops (every tensor on this backend; shapes in comments) -------------------------------
  // out[i, :] = table[ids[i], :].  table [rows, d], ids [n] i32, out [n, d].
  // Also used to gather activation rows (logits of the last token of each sequence).
  virtual absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) = 0;
  // out = x / rms(x) * w over the last dim.  x, out [n, d], w [d].  Also QK-norm ([n*heads, hd]).
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) = 0;
  // residual += x; out = RmsNorm(residual, w).  residual, x, out [n, d].
  virtual absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                                  Tensor* out) = 0;
  // out = x · wᵀ (+ bias).  x [n, k], w [m, k] (HF layout, weight_dtype()), bias [m] or null,
  // out [n, m]. out may be f32 while x is the compute dtype (logits).
  virtual absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) = 0;
  // Rotates x in place.  x [n, heads, head_dim], positions [n] i32.
  virtual absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) = 0;
  // out = silu(gate) * up.  gate, up, out [n, f].
  virtual absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) = 0;
  // The gated MLP's input projection with SwiGLU fused: out = SwiGlu(x · w[0:m]ᵀ, x · w[m:2m]ᵀ) for a fused
  // gate/up weight w [2 m, k], x [n, k], out [n, m]; bitwise what Linear into [n, 2 m] and SwiGlu on its
  // halves give. Unimplemented where the backend has no fused path for the shape (the default): the caller
  // then runs those two ops.
  virtual absl::Status LinearSwiGlu(const Tensor& x, const Tensor& w, Tensor* out) {
    return absl::UnimplementedError("LinearSwiGlu is not implemented by this backend");
  }

  // Sets the ragged batch used by KvAppend and Attention until the next call. The SequenceKv
  // objects must outlive that use.
  virtual absl::Status PrepareBatch(const BatchDesc& batch) = 0;
  // Writes the new tokens' K and V of `layer` into each sequence's cache at past_len + i.
  // k, v [n_tokens, n_kv_heads, head_dim].
  virtual absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) = 0;
  // Rope(q), Rope(k), then KvAppend(layer, k, v) of the rotated k: the step of a resident layer between its
  // projections and its attention, which a backend may run as one kernel (CUDA: one decode kernel instead of
  // two). q [n_tokens, n_heads, head_dim] and k [n_tokens, n_kv_heads, head_dim] are rotated in place (the
  // attention reads them after), v [n_tokens, n_kv_heads, head_dim], positions [n_tokens] i32.
  virtual absl::Status RopeKvAppend(int layer, Tensor* q, Tensor* k, const Tensor& v, const Tensor& positions,
                                    const RopeArgs& rope) {
    if (absl::Status st = RopeQk(q, k, positions, rope); !st.ok()) return st;
    return KvAppend(layer, *k, v);
  }
  // Rope of q [n_tokens, n_heads, head_dim] and k [n_tokens, n_kv_heads, head_dim]: one rotation over both
  // when they are one row's adjacent views (the fused qkv projection's output at one token), else two.
  absl::Status RopeQk(Tensor* q, Tensor* k, const Tensor& positions, const RopeArgs& rope);
  // Causal attention of the new tokens over each sequence's cache (past and new tokens), GQA.
  // q, out [n_tokens, n_heads, head_dim].
  virtual absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) = 0;

  // ---- KV tiers and sparse decode (SpeContext; DESIGN.md §4). Defaults: Unimplemented. ---------
  // Allocates host memory the device can copy from fast (CUDA: cudaHostAlloc, mapped + portable), tagged
  // `kind` and accounted in host_memory_report(), never in memory_report() nor against the device limit.
  // The tensor must be addressable by this backend's kernels (CUDA: a UVA pointer, valid on host and device,
  // tagged DeviceKind::kCuda so that it can stand in for k/v[layer] of an offloaded layer) and readable by the
  // host after Synchronize().
  virtual absl::StatusOr<Tensor> AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) {
    return absl::UnimplementedError("AllocPinnedHost is not implemented by this backend");
  }
  // Live pinned host bytes per kind (limit 0).
  virtual MemoryReport host_memory_report() const { return {}; }
  // Whether host tiers from AllocPinnedHost are interleaved (SequenceKv "Host layout"; core/model/kv_tiers.h
  // decides). Set by backends whose kernels take both layouts (CUDA, on by default); the CPU backend's ops
  // take plain tiers only.
  bool host_kv_interleaved() const { return host_kv_interleaved_; }
  void set_host_kv_interleaved(bool on) { host_kv_interleaved_ = on && SupportsInterleavedHostKv(); }
  virtual bool SupportsInterleavedHostKv() const { return false; }
  // Offloaded layers per interleaved host allocation (SequenceKv "Host layout": layer groups); 1 = one
  // allocation per layer. Only used while host_kv_interleaved(); CUDA defaults to 4.
  int host_kv_layer_group() const { return host_kv_layer_group_; }
  void set_host_kv_layer_group(int layers) { host_kv_layer_group_ = layers < 1 ? 1 : layers; }
  // Host memory the backend did not allocate (a kvstore shared-memory segment) made usable as AllocPinnedHost
  // memory is: CUDA page-locks and maps [ptr, ptr + bytes) (cudaHostRegister, mapped + portable), once per
  // region (core/cuda/cuda_host_register.cc); the CPU backend has nothing to do. `ptr` must be page aligned.
  // Unregister with the same `ptr` after the device's last use of it (Synchronize) and before it is unmapped.
  virtual absl::Status RegisterHostMemory(void* ptr, size_t bytes) {
    return absl::UnimplementedError("RegisterHostMemory is not implemented by this backend");
  }
  virtual absl::Status UnregisterHostMemory(void* ptr) {
    return absl::UnimplementedError("UnregisterHostMemory is not implemented by this backend");
  }
  // A tensor of `dtype`/`shape` over host memory at `host` that this backend's kernels address like an
  // AllocPinnedHost tensor (a stand-in for host_k/host_v): on CUDA `host` must lie in a registered region and
  // the tensor is tagged kCuda with the device-mapped pointer, which must equal `host` (UVA, so one pointer
  // serves host code and kernels; FailedPrecondition otherwise). `storage` becomes the tensor's storage.
  // Not accounted in host_memory_report() (the owner of the memory accounts for it).
  virtual absl::StatusOr<Tensor> WrapHostTensor(void* host, DType dtype, Shape shape, std::shared_ptr<void> storage) {
    return absl::UnimplementedError("WrapHostTensor is not implemented by this backend");
  }
  // Copies a whole device tensor into a pinned host tensor of the same dtype and element count, ordered
  // after the compute stream's earlier work; returns when the copy is done (layer moves, rare).
  virtual absl::Status CopyToPinnedHost(const Tensor& device, Tensor* host) {
    return absl::UnimplementedError("CopyToPinnedHost is not implemented by this backend");
  }
  // Writes the new tokens' K and V of an offloaded `layer` into each sequence's host copy host_k/host_v at
  // past_len + i (batch from PrepareBatch). k, v [n_tokens, n_kv_heads, head_dim] device tensors.
  // CUDA: the append kernel writes the mapped pinned rows directly, on the compute stream (so k/v may be
  // reused, and a dense Attention of the layer reads the rows, in stream order), and records a per-layer
  // event that the layer's next ElasticLoad waits on.
  virtual absl::Status KvAppendHost(int layer, const Tensor& k, const Tensor& v) {
    return absl::UnimplementedError("KvAppendHost is not implemented by this backend");
  }
  // Sets the index sets (and slots) of the decode batch last given to PrepareBatch, used by ElasticLoad and
  // SparseAttention until the next call. sets->n_seqs == batch size, each sequence n_tokens == 1,
  // sets->seq_len[i] == past_len[i], sets->n_kv_heads == the model's KV heads. The backend copies what it
  // needs (CUDA: one async H2D copy per array); the caller may reuse the host arrays after it returns.
  virtual absl::Status PrepareSparseDecode(const SparseDecodeDesc& desc) {
    return absl::UnimplementedError("PrepareSparseDecode is not implemented by this backend");
  }
  // Elastic load of one offloaded layer: for every sequence i and set s of it, each RowCopy {token, slot}
  // of copies copies K and V rows host_k/v[layer][h, token, :] -> slot_k/v[layer][h, slot, :] for every KV
  // head h that set s covers. Checks token < capacity and slot < slot_budget. Adds rows/bytes to
  // `counters` (may be null).
  // CUDA contract: a gather kernel reading mapped pinned memory, enqueued on the copy stream after (a) the
  // previous step's SparseAttention of this layer (it overwrites freed slots) and (b) earlier KvAppendHost
  // of this layer; it records one event per layer, and SparseAttention(layer) waits only on that event.
  // The CopyList is host memory, consumed (copied) before the call returns. Within one PrepareSparseDecode
  // the same CopyList object passed again (every offloaded layer of a step shares the plan's list) is taken
  // as unchanged: a caller that edits a list between layers passes another object.
  virtual absl::Status ElasticLoad(int layer, const CopyList& copies, ElasticCounters* counters) {
    return absl::UnimplementedError("ElasticLoad is not implemented by this backend");
  }
  // ElasticLoad of offloaded layers [first, first + count), in order, all with the same `copies`. A backend
  // may move them in fewer gathers (CUDA: one per host layer group, SequenceKv "Host layout", so a gather
  // reads a token's rows of several layers from one host page); SparseAttention(layer) still waits only on
  // the gather that loads `layer`.
  virtual absl::Status ElasticLoadLayers(int first, int count, const CopyList& copies, ElasticCounters* counters) {
    for (int l = first; l < first + count; ++l) {
      if (absl::Status st = ElasticLoad(l, copies, counters); !st.ok()) return st;
    }
    return absl::OkStatus();
  }
  // Sparse decode attention of `layer` (DESIGN.md §3): for sequence i and query head h (KV head
  // g = h / (n_heads / n_kv_heads)), exact softmax attention of q[i, h] over the past positions of the set
  // of (i, g) plus the current token (k_cur[i, g], v_cur[i, g]). A resident layer gathers the positions
  // from kv[i]->k/v[layer]; an offloaded layer reads kv[i]->slot_k/v[layer] at the slots of the prepared
  // desc (after its ElasticLoad). q, out [n_seqs, n_heads, head_dim]; k_cur, v_cur [n_seqs, n_kv, head_dim].
  // The current token must also have been appended (KvAppend / KvAppendHost) but is read from k_cur/v_cur.
  virtual absl::Status SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur,
                                       float scale, Tensor* out) {
    return absl::UnimplementedError("SparseAttention is not implemented by this backend");
  }

  // ---- evaluation of selection sources (core/sparse/selection_source.h; defaults: Unimplemented) ---------
  // Per-layer index sets (oracle, quest): replaces the positions of the sets the last PrepareSparseDecode
  // prepared with `layer`'s own choice, computed from q [n_seqs, n_heads, head_dim] (the layer's rotated
  // queries of the decode tokens) and the layer's KV rows [0, past_len) (resident layers only:
  // FailedPrecondition for an offloaded one). Every set keeps its prepared size, which must be
  // min(budget, past_len) as any selection gives; spec.mode must match the prepared sets per sequence. The
  // positions serve SparseAttention(layer) and AttentionRecall(layer) until the next call or
  // PrepareSparseDecode. CUDA: on the compute stream, no host wait (the host never sees these positions).
  virtual absl::Status SelectLayerIndexSets(int layer, const Tensor& q, const LayerSelectionSpec& spec) {
    return absl::UnimplementedError("SelectLayerIndexSets is not implemented by this backend");
  }
  // Attention recall probe (core/sparse/attention_recall.h): for sequence i and query head h of KV head g,
  // lse[i, h, 0] = log Σ_{t < past_len} exp(scale · q[i, h] · k[layer][g, t]) over the layer's KV (the current
  // token excluded; an offloaded layer reads its full host copy) and lse[i, h, 1] the same over the positions
  // of the prepared set of (i, g); recall = exp(lse[.., 1] - lse[.., 0]). q [n_seqs, n_heads, head_dim] as
  // for SparseAttention; lse f32 [n_seqs, n_heads, 2], a tensor of this backend (CUDA: written on the compute
  // stream, read after a Synchronize or ToHost).
  virtual absl::Status AttentionRecall(int layer, const Tensor& q, float scale, Tensor* lse) {
    return absl::UnimplementedError("AttentionRecall is not implemented by this backend");
  }

  // ---- batch invariance (optional; default: off and not offered) ------------------------------------
  // Batch-invariant mode: every op computes a row (a token of a sequence) with a reduction order that does
  // not depend on the other rows of the batch, their number or their lengths, so a sequence's logits are
  // bitwise the same whatever it is batched with (docs/gpu.md "Batch-invariant decoding"). Costs speed.
  virtual bool batch_invariant() const { return false; }
  // Turns the mode on or off. Unimplemented when `enabled` and the backend has no such mode.
  virtual absl::Status set_batch_invariant(bool enabled) {
    if (!enabled) return absl::OkStatus();
    return absl::UnimplementedError(absl::StrCat("backend ", name(), " has no batch-invariant mode"));
  }

  // ---- step graphs and device-side token selection (optional; defaults: none) --------------------
  // Whether RunStepGraph records and replays graphs (CUDA graphs).
  virtual bool step_graphs() const { return false; }
  // Turns graph recording on or off where supported (benchmarks show both; on by default on CUDA).
  virtual void set_step_graphs(bool enabled) {}
  // Runs `body`, ops on this backend, as the replayable step `key`. Contract for `body`: tensors it uses
  // that were allocated outside it keep their addresses while `key` is in use (inputs are refreshed by
  // copies before the call); its ops' shapes depend only on `key`; it uploads nothing and never waits for
  // the device. Workspace it allocates belongs to the step's graph (MemoryKind::kGraphs). A backend that
  // records graphs captures `body` on the first call for `key` (again when buffers of its own that the
  // batch metadata lives in have moved) and later replays it without calling `body`; a `body` that cannot
  // be recorded runs directly. Default: `body()`.
  virtual absl::Status RunStepGraph(uint64_t key, const std::function<absl::Status()>& body) { return body(); }
  // Key bit of a step whose body runs SparseAttention over the state PrepareSparseDecode left (index sets,
  // per-layer KV tables, split plan): a recording backend re-records such a step when that state's buffers
  // move or its attention plan (set sizes) changes, and runs the body directly the first time it sees a new
  // state so that the buffers the ops size for themselves exist before the recording.
  static constexpr uint64_t kStepGraphSparse = uint64_t{1} << 63;
  // Forgets the graphs of keys in [key_begin, key_end) and frees their memory (their owner is going away).
  virtual void DropStepGraphs(uint64_t key_begin, uint64_t key_end) {}
  // Whether SampleTokens is implemented (then the engine samples on the device, downloading only ids).
  virtual bool device_sampling() const { return false; }
  // tokens[i] = the token row i of `logits` [rows.size(), vocab] f32 (a tensor of this backend) selects
  // under rows[i]; waits for the result.
  virtual absl::Status SampleTokens(const Tensor& logits, std::span<const TokenSampling> rows,
                                    std::span<int32_t> tokens) {
    return absl::UnimplementedError("SampleTokens is not implemented by this backend");
  }

 private:
  bool host_kv_interleaved_ = false;
  int host_kv_layer_group_ = 1;
};

// The CPU backend (always built). `memory_limit` 0 means no limit.
std::unique_ptr<Backend> MakeCpuBackend(int64_t memory_limit = 0);

}  // namespace specontext
