// CudaBackend's fused ops for small-batch decode: fewer, larger kernels per layer (each kernel of a decode
// step at batch 1 is latency-bound, so one launch less is a few microseconds less per layer).
//   LinearSwiGlu   the gate/up GEMV with SwiGLU in its epilogue (kernels/gemv.cu), n <= gemv_max_n.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels/gemv.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

bool IsDevBf16(const Tensor& t, int ndim) {
  return t.device() == DeviceKind::kCuda && t.dtype() == DType::kBF16 && t.ndim() == ndim;
}

}  // namespace

absl::Status CudaBackend::LinearSwiGlu(const Tensor& x, const Tensor& w, Tensor* out) {
  if (out == nullptr || !IsDevBf16(x, 2) || !IsDevBf16(w, 2) || !IsDevBf16(*out, 2)) {
    return absl::InvalidArgumentError(absl::StrCat("linear+swiglu: x ", x.DebugString(), ", w ", w.DebugString(),
                                                   ", out ", out == nullptr ? "null" : out->DebugString(),
                                                   ": all bf16 on the GPU, 2-D"));
  }
  const int64_t n = x.dim(0), k = x.dim(1), m = out->dim(1);
  if (w.dim(1) != k || w.dim(0) != 2 * m || out->dim(0) != n) {
    return absl::InvalidArgumentError(absl::StrCat("linear+swiglu: x ", ShapeToString(x.shape()), " w ",
                                                   ShapeToString(w.shape()), " out ", ShapeToString(out->shape()),
                                                   ", expected w [2 m, k] for out [n, m]"));
  }
  if (n == 0 || m == 0) return absl::OkStatus();
  constexpr int64_t kIntMax = 0x7fffffff;
  GemvParams g;
  g.x = x.data();
  g.w = w.data();
  g.out = out->data();
  g.n = static_cast<int>(std::min(n, kIntMax));
  g.m = static_cast<int>(std::min(m, kIntMax));
  g.k = static_cast<int>(std::min(k, kIntMax));
  g.swiglu = true;
  // Batches the GEMV does not serve (cuBLAS) keep the two-op path: Unimplemented tells the caller so.
  if (n > options_.gemv_max_n || 2 * m > kIntMax || k > kIntMax || !GemvSupported(g)) {
    return absl::UnimplementedError(absl::StrCat("linear+swiglu: no fused path for n ", n, ", k ", k));
  }
  RETURN_IF_CUDA_ERROR(LaunchGemv(g, stream_));
  return absl::OkStatus();
}

}  // namespace specontext::cuda
