// CudaBackend ops used by the retrieval head on the backend (core/sparse/retrieval_head_device.h):
// CopyToColumns (one strided 2D copy) and ScatterRows (one kernel for a whole ragged batch; its segment
// table goes up through pinned staging, so nothing here waits for the GPU).
#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/cuda/kernels/row_scatter.h"
#include "core/status_macros.h"

namespace specontext::cuda {

struct CudaBackend::RetrievalOpsState {
  PinnedStaging staging;
  Tensor table;  // device ScatterSegment[] (kWorkspace), grown on demand
  std::vector<ScatterSegment> host;
  ~RetrievalOpsState() {
    if (staging.ready != nullptr) cudaEventDestroy(staging.ready);
    if (staging.host != nullptr) cudaFreeHost(staging.host);
  }
};

absl::StatusOr<CudaBackend::RetrievalOpsState*> CudaBackend::RetrievalOps() {
  if (retrieval_ops_ != nullptr) return retrieval_ops_.get();
  auto st = std::make_shared<RetrievalOpsState>();
  RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&st->staging.ready, cudaEventDisableTiming));
  retrieval_ops_ = std::move(st);
  return retrieval_ops_.get();
}

absl::Status CudaBackend::CopyToColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
  RETURN_IF_ERROR(CheckCopyToColumns(src, col_begin, *dst));
  if (src.device() != DeviceKind::kCuda || dst->device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError("CopyToColumns: tensors must be on the GPU");
  }
  if (src.nbytes() == 0) return absl::OkStatus();
  const size_t es = DTypeSize(src.dtype());
  RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(static_cast<char*>(dst->data()) + col_begin * es, dst->dim(1) * es,
                                         src.data(), src.dim(1) * es, src.dim(1) * es, src.dim(0),
                                         cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::ScatterRows(const Tensor& src, std::span<const RowScatter> segments) {
  RETURN_IF_ERROR(CheckScatterRows(src, segments));
  if (src.numel() > 0 && src.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("ScatterRows: source ", src.DebugString(), " is not on the GPU"));
  }
  ASSIGN_OR_RETURN(RetrievalOpsState * st, RetrievalOps());
  RowScatterParams p;
  p.src = src.data();
  p.heads = static_cast<int>(src.dim(1));
  p.row_bytes = src.dim(2) * static_cast<int64_t>(DTypeSize(src.dtype()));
  // The widest access dividing the row size and every base address.
  uintptr_t bits = reinterpret_cast<uintptr_t>(src.data()) | static_cast<uintptr_t>(p.row_bytes);
  st->host.clear();
  for (size_t s = 0; s < segments.size(); ++s) {
    const RowScatter& g = segments[s];
    if (g.n_rows == 0) continue;
    if (g.dst->device() != DeviceKind::kCuda) {
      return absl::InvalidArgumentError(absl::StrCat("ScatterRows: segment ", s, " destination is not on the GPU"));
    }
    bits |= reinterpret_cast<uintptr_t>(g.dst->data());
    st->host.push_back({g.dst->data(), g.dst->dim(1), g.row_begin, g.n_rows, g.pos, 0});
    p.max_rows = std::max(p.max_rows, g.n_rows);
  }
  if (st->host.empty() || p.row_bytes == 0 || p.heads == 0) return absl::OkStatus();
  p.access_bytes = bits % 16 == 0 ? 16 : bits % 4 == 0 ? 4 : bits % 2 == 0 ? 2 : 1;
  const size_t bytes = sizeof(ScatterSegment) * st->host.size();
  RETURN_IF_ERROR(EnsureDeviceBuffer(*memory_, &st->table, bytes, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(StagedUpload(st->staging, st->host.data(), bytes, st->table.data(), stream_));
  p.segments = static_cast<const ScatterSegment*>(st->table.data());
  p.n_segments = static_cast<int>(st->host.size());
  RETURN_IF_CUDA_ERROR(LaunchRowScatter(p, stream_));
  return absl::OkStatus();
}

}  // namespace specontext::cuda
