// The CPU backend: f32 everywhere, GEMMs through OpenBLAS, other ops threaded with OpenMP.
// It is the reference every other backend is compared with.
#pragma once

#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/cpu/cpu_memory.h"
#include "core/sparse/index_sets.h"

namespace specontext {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int64_t memory_limit);

  DeviceKind device() const override { return DeviceKind::kCpu; }
  std::string name() const override { return "cpu"; }
  DType compute_dtype() const override { return DType::kF32; }
  // bf16 checkpoints stay bf16 (half the bytes decode must read); everything else becomes f32.
  DType weight_dtype(DType stored) const override { return stored == DType::kBF16 ? DType::kBF16 : DType::kF32; }

  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) override;
  absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) override;
  absl::Status CopyToDevice(const Tensor& host, Tensor* device) override;
  absl::Status ToHost(const Tensor& device, Tensor* host) override;
  absl::Status CopyDevice(const Tensor& src, Tensor* dst) override { return CopyToDevice(src, dst); }
  absl::Status Zero(Tensor* t) override;
  absl::Status CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) override;
  // Retrieval head support (cpu_retrieval_ops.cc).
  absl::Status CopyToColumns(const Tensor& src, int64_t col_begin, Tensor* dst) override;
  absl::Status CopyHeadRows(const Tensor& src, Tensor* dst, int64_t rows) override;
  absl::Status CopyKvPairRows(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) override;
  absl::Status ScatterRows(const Tensor& src, std::span<const RowScatter> segments) override;
  absl::Status SelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                               SelectionResult* out) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  MemoryReport memory_report() const override { return memory_->Report(); }
  int64_t available_bytes() const override;

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) override;
  absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                          Tensor* out) override;
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) override;
  absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) override;
  absl::Status PrepareBatch(const BatchDesc& batch) override;
  absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) override;

  // KV tiers and sparse decode (cpu_sparse.cc). "Pinned host" memory is plain memory with its own
  // accounting (host_memory_report), outside the device limit.
  absl::StatusOr<Tensor> AllocPinnedHost(DType dtype, Shape shape, MemoryKind kind) override;
  MemoryReport host_memory_report() const override { return host_memory_->Report(); }
  absl::Status CopyToPinnedHost(const Tensor& device, Tensor* host) override;
  // Host memory is what the CPU backend computes on: nothing to register, tensors are plain views.
  absl::Status RegisterHostMemory(void*, size_t) override { return absl::OkStatus(); }
  absl::Status UnregisterHostMemory(void*) override { return absl::OkStatus(); }
  absl::StatusOr<Tensor> WrapHostTensor(void* host, DType dtype, Shape shape, std::shared_ptr<void> storage) override {
    return Tensor(host, dtype, std::move(shape), DeviceKind::kCpu, std::move(storage));
  }
  absl::Status KvAppendHost(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status PrepareSparseDecode(const SparseDecodeDesc& desc) override;
  absl::Status ElasticLoad(int layer, const CopyList& copies, ElasticCounters* counters) override;
  absl::Status SparseAttention(int layer, const Tensor& q, const Tensor& k_cur, const Tensor& v_cur, float scale,
                               Tensor* out) override;
  // Selection sources and the recall probe (cpu_layer_selection.cc): oracle = SelectTopB and quest =
  // QuestSelectTopB over the layer's own q and K, the recall by AttentionRecallCpu.
  absl::Status SelectLayerIndexSets(int layer, const Tensor& q, const LayerSelectionSpec& spec) override;
  absl::Status AttentionRecall(int layer, const Tensor& q, float scale, Tensor* lse) override;
  // Linear is the only op whose per-row bits depend on the batch (GEMV for up to 8 rows, sgemm above, whose
  // kernels follow the shape); attention, norms and the rest compute each row alone. The mode runs every
  // row of a Linear on the one-row path (cpu_gemm.h).
  bool batch_invariant() const override { return batch_invariant_; }
  absl::Status set_batch_invariant(bool enabled) override {
    batch_invariant_ = enabled;
    return absl::OkStatus();
  }
  /// The sets SparseAttention reads now (the prepared ones, or a layer's after SelectLayerIndexSets): tests.
  const IndexSets& prepared_sparse_sets() const { return sparse_sets_; }

 private:
  std::shared_ptr<CpuMemory> memory_;
  std::shared_ptr<CpuMemory> host_memory_ = std::make_shared<CpuMemory>(0);
  BatchDesc batch_;
  IndexSets sparse_sets_;            // copy of the prepared sparse decode sets
  std::vector<int32_t> sparse_slots_;
  // SparseDecodeDesc::dense_resident: the prepared sets with every flagged sequence's sets replaced by all of
  // its past [0, seq_len) (budget raised to fit); what resident layers read. n_seqs 0: no flag set.
  IndexSets dense_resident_sets_;
  bool batch_invariant_ = false;
};

// Shape checks shared by the backends' argument validation.
absl::Status CheckTensor(const Tensor& t, std::string_view what, DType dtype, int ndim);
absl::Status CheckSameShape(const Tensor& a, const Tensor& b, std::string_view what);
// `height` rows of `width` bytes from src (rows `spitch` bytes apart) to dst (`dpitch` apart), as
// cudaMemcpy2D: the CPU side of the strided copies (column slices, per-head row ranges).
void Copy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, int64_t height);
absl::Status CheckCopyColumns(const Tensor& src, int64_t col_begin, const Tensor& dst);
// CopyToColumns / ScatterRows argument checks (cpu_retrieval_ops.cc), shared with the CUDA backend.
absl::Status CheckCopyToColumns(const Tensor& src, int64_t col_begin, const Tensor& dst);
absl::Status CheckCopyHeadRows(const Tensor& src, const Tensor* dst, int64_t rows);
absl::Status CheckScatterRows(const Tensor& src, std::span<const RowScatter> segments);
// CopyKvPairRows: its check, and the copy as per-(head, K/V) strided copies through `copy_2d` (Copy2D's
// arguments), shared with the CUDA backend (also for its prefill staging, which copies into raw buffers).
absl::Status CheckCopyKvPairRows(const Tensor* k, const Tensor* v, const Tensor* pair, int64_t rows);
struct KvPairCopy {
  char* k;             // plain [heads, k_rows, d]
  int64_t k_rows;
  char* v;             // plain [heads, v_rows, d]
  int64_t v_rows;
  char* pair;          // interleaved [heads, pair_rows, 2, d] (or a layer group's view, SequenceKv "Host layout")
  int64_t pair_rows;
  int64_t heads, rows, row_bytes;  // rows [0, rows) of every head, row_bytes = d * element size
  bool to_pair;        // plain -> pair, else pair -> plain
  int64_t pair_pitch = 0;  // bytes from a head's pair row t to t + 1 (KvRowsOf stride); 0: 2 * row_bytes
};
KvPairCopy KvPairCopyOf(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair);
void CopyKvPairRowsOn(const KvPairCopy& c,
                      const std::function<void(void*, size_t, const void*, size_t, size_t, int64_t)>& copy_2d);
// Validates a ragged batch against q/k rows and each sequence's KV capacity and layer count.
absl::Status CheckBatch(const BatchDesc& batch, int layer, int64_t n_rows);

}  // namespace specontext
