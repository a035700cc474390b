// The CudaBackend class (internal to core/cuda; users include cuda_backend.h).
#pragma once

#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_memory.h"
#include "core/cuda/kernels/attention.h"

namespace specontext::cuda {

// Pinned host staging for metadata uploads; `ready` is recorded after each copy out of it so the
// next write waits only for that copy.
struct PinnedStaging {
  void* host = nullptr;
  size_t bytes = 0;
  cudaEvent_t ready = nullptr;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options);
  ~CudaBackend() override;
  // Creates the stream, cuBLAS handle and fixed buffers; called once by MakeCudaBackend.
  absl::Status Init();

  DeviceKind device() const override { return DeviceKind::kCuda; }
  std::string name() const override { return name_; }
  DType compute_dtype() const override { return DType::kBF16; }

  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) override;
  absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) override;
  absl::Status CopyToDevice(const Tensor& host, Tensor* device) override;
  absl::Status ToHost(const Tensor& device, Tensor* host) override;
  absl::Status CopyDevice(const Tensor& src, Tensor* dst) override;
  absl::Status CopyHeadRows(const Tensor& src, Tensor* dst, int64_t rows) override;
  absl::Status CopyKvPairRows(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) override;
  bool SupportsInterleavedHostKv() const override { return true; }
  absl::Status Zero(Tensor* t) override;
  absl::Status CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) override;
  // Retrieval head support (cuda_retrieval_ops.cc; selection in cuda_selection.cc).
  absl::Status CopyToColumns(const Tensor& src, int64_t col_begin, Tensor* dst) override;
  absl::Status ScatterRows(const Tensor& src, std::span<const RowScatter> segments) override;
  absl::Status SelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                               SelectionResult* out) override;
  absl::Status StartSelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                                    SelectionResult* out) override;
  absl::Status FinishSelectIndexSets(SelectionResult* out) override;
  int64_t SelectionWorkspaceBytes(int32_t n_seqs, int32_t n_q, int32_t sets_per_seq, int32_t max_len,
                                  int32_t budget) const override;
  // Attention's buffers (cuda_attention.cc) plus SparseAttention's and the index sets' (cuda_sparse_ops.cc).
  int64_t AttentionWorkspaceBytes(const AttentionWorkspaceShape& shape) const override;
  absl::Status Synchronize() override;
  absl::Status MakeCurrent() override;
  MemoryReport memory_report() const override { return memory_->Report(); }
  int64_t available_bytes() const override { return memory_->Available(); }

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) override;
  absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                          Tensor* out) override;
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) override;
  absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) override;
  absl::Status LinearSwiGlu(const Tensor& x, const Tensor& w, Tensor* out) override;  // cuda_fused_ops.cc
  absl::Status PrepareBatch(const BatchDesc& batch) override;
  absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status RopeKvAppend(int layer, Tensor* q, Tensor* k, const Tensor& v, const Tensor& positions,
                            const RopeArgs& rope) override;  // cuda_fused_ops.cc
  absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) override;

  // ---- KV tiers and sparse decode (cuda_sparse.cc) ----
  absl::StatusOr<Tensor> AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) override;
  MemoryReport host_memory_report() const override;
  absl::Status CopyToPinnedHost(const Tensor& device, Tensor* host) override;
  absl::Status KvAppendHost(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status PrepareSparseDecode(const SparseDecodeDesc& desc) override;
  absl::Status ElasticLoad(int layer, const CopyList& copies, ElasticCounters* counters) override;
  absl::Status ElasticLoadLayers(int first, int count, const CopyList& copies, ElasticCounters* counters) override;
  absl::Status SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur, float scale,
                               Tensor* out) override;
  // ---- selection sources and the recall probe (cuda_layer_selection.cc) ----
  absl::Status SelectLayerIndexSets(int layer, const Tensor& q, const LayerSelectionSpec& spec) override;
  absl::Status AttentionRecall(int layer, const Tensor& q, float scale, Tensor* lse) override;
  // Tests: waits for the stream and returns the positions SparseAttention reads now (the prepared ones, or
  // a layer's after SelectLayerIndexSets), laid out as the prepared sets.
  absl::StatusOr<std::vector<int32_t>> PreparedPositions();
  // ---- host memory registered by its owner, e.g. a kvstore segment (cuda_host_register.cc) ----
  absl::Status RegisterHostMemory(void* ptr, size_t bytes) override;
  absl::Status UnregisterHostMemory(void* ptr) override;
  absl::StatusOr<Tensor> WrapHostTensor(void* host, DType dtype, Shape shape, std::shared_ptr<void> storage) override;
  // Waits for the copy stream (elastic loads). SparseAttention(layer) orders itself after its layer's
  // load; code that reads slot buffers otherwise (tests, benchmarks) calls this first.
  absl::Status SyncCopyStream();
  struct SparseState;  // internal (cuda_sparse_state.h)

  // ---- prefill attention of offloaded layers from a device copy (cuda_prefill_staging.cc) ----
  // A batch with prefill tokens reads K/V of an offloaded layer once per 64-row query tile; over mapped host
  // memory that is PCIe traffic times the tile count. Attention(l) of such a batch first copies each prefill
  // sequence's rows [0, past_len + n_tokens) of layer l (after this step's KvAppendHost) into a device
  // staging buffer (kWorkspace, reused by every layer) and runs the tiles over the copy. Sequences are
  // staged in rounds whose bytes fit the limit; a sequence larger than the limit (or a buffer that cannot be
  // allocated) keeps the direct path, with a warning. Decode-only batches never stage.
  static constexpr int64_t kDefaultPrefillStagingBytes = int64_t{1} << 30;
  struct PrefillStagingStats {
    int64_t staged_layers = 0;  // Attention calls that read a staged copy
    int64_t staged_copies = 0;  // (sequence, layer) K+V copies made
    int64_t staged_bytes = 0;   // bytes copied from host into the staging buffer
    int64_t direct_seqs = 0;    // (sequence, batch) pairs left on the direct path (too large / no memory)
    int64_t max_rounds = 0;     // most rounds one batch needed
  };
  PrefillStagingStats prefill_staging_stats() const { return prefill_staging_stats_; }
  // Bytes the staging buffer may take (K and V of the sequences of one round); 0 turns staging off.
  void set_prefill_staging_limit(int64_t bytes) { prefill_staging_limit_ = bytes < 0 ? 0 : bytes; }
  int64_t prefill_staging_limit() const { return prefill_staging_limit_; }

  // ---- batch-invariant mode (CudaBackendOptions::batch_invariant) ----
  // Takes effect at the next PrepareBatch / PrepareSparseDecode; recorded step graphs are dropped.
  bool batch_invariant() const override { return batch_invariant_; }
  absl::Status set_batch_invariant(bool enabled) override;

  // ---- step graphs (cuda_graph.cc) and token selection (cuda_sampling_ops.cc) ----
  bool step_graphs() const override { return graphs_enabled_; }
  void set_step_graphs(bool enabled) override { graphs_enabled_ = enabled; }
  absl::Status RunStepGraph(uint64_t key, const std::function<absl::Status()>& body) override;
  void DropStepGraphs(uint64_t key_begin, uint64_t key_end) override;
  bool device_sampling() const override { return true; }
  absl::Status SampleTokens(const Tensor& logits, std::span<const TokenSampling> rows,
                            std::span<int32_t> tokens) override;
  // Graphs recorded so far (tests): captures and replays since the backend was made.
  struct GraphStats {
    int64_t captures = 0;
    int64_t replays = 0;
    int64_t fallbacks = 0;  // bodies that could not be recorded and ran directly
  };
  GraphStats graph_stats() const { return graph_stats_; }

  cudaStream_t stream() const { return stream_; }
  int sm_count() const { return sm_count_; }

 private:
  // Waits for the stream and turns a device-side error flag (bad token id) into a status.
  absl::Status SyncAndCheck();
  // Copies `bytes` of `src` through `staging` into device memory `dst` on the stream.
  absl::Status Upload(PinnedStaging& staging, const void* src, size_t bytes, void* dst);
  // Grows a device byte buffer (kWorkspace) to at least `bytes`.
  absl::Status EnsureBuffer(Tensor* buf, size_t bytes);
  // The parts of AttentionWorkspaceBytes: meta_, plan_ and partials_ (cuda_attention.cc); the sparse
  // partials and sets_buf (cuda_sparse_ops.cc; 0 without a budget).
  int64_t DenseAttentionWorkspaceBytes(const AttentionWorkspaceShape& shape) const;
  int64_t SparseAttentionWorkspaceBytes(const AttentionWorkspaceShape& shape) const;
  // Builds and uploads the attention work lists of the current batch for `n_heads` query heads.
  absl::Status PlanAttention(int n_heads);
  // Launches the planned decode items of the batch (plan_) and their split-K combine pass.
  absl::Status LaunchPlannedDecode(AttnParams p);
  // Checks k/v [n_tokens, n_kv, head_dim] for KvAppend of `layer` and fills the append kernel's params
  // (cuda_attention.cc; RopeKvAppend uses it too).
  absl::Status KvAppendArgs(const char* op, int layer, const Tensor& k, const Tensor& v, KvAppendParams* p);
  // A KvPairCopy (core/cpu/cpu_backend.h) as strided copies on the compute stream: CopyKvPairRows and the
  // prefill staging of interleaved host tiers.
  absl::Status CopyKvPairOnStream(const KvPairCopy& c);

  const CudaBackendOptions options_;
  std::string name_;
  std::shared_ptr<CudaMemory> memory_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  Tensor cublas_workspace_;
  int sm_count_ = 1;
  int* error_flag_host_ = nullptr;  // mapped pinned memory
  int* error_flag_dev_ = nullptr;

  // ---- current batch (PrepareBatch) ----
  BatchDesc batch_;
  bool batch_valid_ = false;
  int n_layers_ = 0;
  int n_kv_ = 0;
  int head_dim_ = 0;
  Tensor meta_;  // [AttnSeq L x S][row_seq i32 x T][k ptrs L x S][v ptrs L x S]
  size_t off_row_seq_ = 0, off_k_ptrs_ = 0, off_v_ptrs_ = 0;
  PinnedStaging batch_staging_;

  // ---- attention plan, built on the first Attention call after PrepareBatch ----
  int planned_heads_ = 0;  // 0 = no plan
  Tensor plan_;            // [prefill items][decode items][combine items]
  int n_prefill_items_ = 0, n_decode_items_ = 0, n_combine_ = 0;
  size_t off_decode_ = 0, off_combine_ = 0;
  Tensor partials_;  // split-K partial O and LSE
  size_t off_lse_ = 0;
  PinnedStaging plan_staging_;

  // ---- decode-only batches: split plan on the device (cuda_attention.cc) ----
  // Batch-invariant mode also runs the decode rows of mixed batches with this plan (max_splits_ is then
  // kBatchInvariantDecodeSplits for every batch), so a decoding row sees the same splits and merge either way.
  bool batch_invariant_ = false;
  bool decode_only_ = false;
  int max_splits_ = 0;  // 0: not a decode-only batch the device plan serves

  // ---- step graphs (cuda_graph.cc) ----
  struct StepGraph;
  void DestroyGraphs();
  bool graphs_enabled_ = true;
  bool capturing_ = false;       // a stream capture is in progress: uploads and plans refuse
  uint64_t layout_epoch_ = 0;    // bumped when a buffer graphs read (meta_, partials_) moves
  std::map<uint64_t, std::shared_ptr<StepGraph>> graphs_;
  GraphStats graph_stats_;

  // ---- token selection (cuda_sampling_ops.cc): created on first use ----
  std::shared_ptr<void> sampler_;  // CudaSampler
  Tensor sampled_;                 // [max rows] i32 device
  int* sampled_host_ = nullptr;    // pinned
  int sampled_capacity_ = 0;

  // ---- KV tiers and sparse decode (cuda_sparse.cc): copy stream, per-layer events, index-set buffers.
  // Created on first use; shared_ptr because the type is complete only in cuda_sparse_state.h.
  absl::StatusOr<SparseState*> Sparse();
  // Waits for the copies of a started selection nobody finished (its pinned buffer is about to be reused).
  absl::Status WaitPendingSelection(SparseState* sp);
  absl::Status EnsureTierTables(int layer);
  // What a per-layer op inside a prepared sparse step (layer selection, attention recall) checks
  // first: a prepared batch and sparse decode, `layer` in range, q a bf16 [n_seqs, n_heads,
  // head_dim] whose heads fill the KV groups. The sparse state and q's head count.
  struct LayerOpContext {
    SparseState* sp = nullptr;
    int64_t n_heads = 0;
  };
  absl::StatusOr<LayerOpContext> CheckLayerOp(const char* op, int layer, const Tensor& q);
  std::shared_ptr<SparseState> sparse_;
  std::vector<std::pair<char*, size_t>> registered_host_;  // RegisterHostMemory regions: base, bytes

  // ---- prefill staging (cuda_prefill_staging.cc): `p` is Attention's parameters for `layer` (plan built);
  // runs the layer's attention over staged copies and sets *done, or leaves *done false (direct path).
  struct PrefillStagingState;
  absl::Status StagedPrefillAttention(int layer, AttnParams p, bool* done);
  absl::Status PlanPrefillStaging(PrefillStagingState* st);
  std::shared_ptr<PrefillStagingState> prefill_staging_;
  PrefillStagingStats prefill_staging_stats_;
  int64_t prefill_staging_limit_ = kDefaultPrefillStagingBytes;
  uint64_t batch_serial_ = 0;                // bumped by PrepareBatch
  std::vector<int32_t> prefill_item_begin_;  // [n_seqs + 1]: each sequence's prefill items in plan_ (PlanAttention)

  // ---- retrieval head ops (cuda_retrieval_ops.cc): ScatterRows' segment table and its pinned staging,
  // created on first use (shared_ptr: the type is complete only there; it frees its own event and memory).
  struct RetrievalOpsState;
  absl::StatusOr<RetrievalOpsState*> RetrievalOps();
  std::shared_ptr<RetrievalOpsState> retrieval_ops_;
};

}  // namespace specontext::cuda
