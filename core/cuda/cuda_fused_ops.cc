// CudaBackend's fused ops for small-batch decode: fewer, larger kernels per layer (each kernel of a decode
// step at batch 1 is latency-bound, so one launch less is a few microseconds less per layer).
//   LinearSwiGlu   the gate/up GEMV with SwiGLU in its epilogue (kernels/gemv.cu), n <= gemv_max_n (not in
//                  the batch-invariant mode).
//   RopeKvAppend   RoPE of q and k and the KV append of a resident layer in one kernel (kernels/rope.cu).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels/attention.h"
#include "core/cuda/kernels/gemv.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

bool IsDevBf16(const Tensor& t, int ndim) {
  return t.device() == DeviceKind::kCuda && t.dtype() == DType::kBF16 && t.ndim() == ndim;
}

// SPC_FUSED_ROPE_APPEND=0 in the environment runs RopeKvAppend as its two ops (A/B of the fused kernel).
bool FusedRopeAppend() {
  static const bool on = [] {
    const char* e = std::getenv("SPC_FUSED_ROPE_APPEND");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
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
  // Batches the GEMV does not serve (cuBLAS) keep the two-op path: Unimplemented tells the caller so. So
  // does the batch-invariant mode: its Linear is one kernel for every row count, the GEMV serves a few rows.
  if (batch_invariant_ || n > options_.gemv_max_n || 2 * m > kIntMax || k > kIntMax || !GemvSupported(g)) {
    return absl::UnimplementedError(absl::StrCat("linear+swiglu: no fused path for n ", n, ", k ", k));
  }
  RETURN_IF_CUDA_ERROR(LaunchGemv(g, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::RopeKvAppend(int layer, Tensor* q, Tensor* k, const Tensor& v, const Tensor& positions,
                                       const RopeArgs& rope) {
  if (q == nullptr || k == nullptr) return absl::InvalidArgumentError("rope+kv_append: null q or k");
  KvAppendParams kv;
  RETURN_IF_ERROR(KvAppendArgs("rope+kv_append", layer, *k, v, &kv));
  const bool fit = IsDevBf16(*q, 3) && positions.ndim() == 1 && positions.device() == DeviceKind::kCuda &&
                   positions.dtype() == DType::kI32 && positions.dim(0) == k->dim(0) && q->dim(0) == k->dim(0) &&
                   q->dim(2) == k->dim(2) && rope.inv_freq != nullptr &&
                   rope.inv_freq->device() == DeviceKind::kCuda && rope.inv_freq->dtype() == DType::kF32 &&
                   rope.inv_freq->numel() == k->dim(2) / 2 && k->dim(2) % 8 == 0 && Aligned16(k->data()) &&
                   Aligned16(v.data());
  if (!fit || !FusedRopeAppend()) {
    // The two ops (they check and report what does not fit).
    RETURN_IF_ERROR(RopeQk(q, k, positions, rope));
    return KvAppend(layer, *k, v);
  }
  RopeKvAppendParams p;
  p.kv = kv;
  p.q = q->data();
  p.k = k->data();
  p.positions = positions.as<int32_t>();
  p.inv_freq = rope.inv_freq->as<float>();
  p.n_heads = static_cast<int>(q->dim(1));
  p.interleaved = rope.interleaved;
  p.attention_scaling = rope.attention_scaling;
  RETURN_IF_CUDA_ERROR(LaunchRopeKvAppend(p, stream_));
  return absl::OkStatus();
}

}  // namespace specontext::cuda
