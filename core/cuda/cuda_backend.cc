// CudaBackend: construction, memory and copies, and the row/element ops and Linear.
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels/elementwise.h"
#include "core/cuda/kernels/gemm_invariant.h"
#include "core/cuda/kernels/gemv.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext {

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  const int n = CudaDeviceCount();
  if (n == 0) return absl::FailedPreconditionError("no CUDA device available (driver or GPU missing)");
  if (options.device < 0 || options.device >= n) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device, " does not exist (",
                                                      n, " devices)"));
  }
  if (options.gemv_max_n < 0 || options.gemv_max_n > cuda::kGemvMaxN) {
    return absl::InvalidArgumentError(absl::StrCat("gemv_max_n must be in [0, ", cuda::kGemvMaxN, "]"));
  }
  auto backend = std::make_unique<cuda::CudaBackend>(options);
  RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

int64_t CudaDeviceFreeBytes(int device) {
  int current = 0;
  size_t free_bytes = 0, total = 0;
  if (cudaGetDevice(&current) != cudaSuccess || cudaSetDevice(device) != cudaSuccess ||
      cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
    cudaGetLastError();
    cudaSetDevice(current);
    return 0;
  }
  cudaSetDevice(current);
  return static_cast<int64_t>(free_bytes);
}

absl::StatusOr<void*> CudaComputeStream(Backend& backend) {
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(&backend);
  if (cuda == nullptr) return absl::InvalidArgumentError(absl::StrCat("backend ", backend.name(), " is not CUDA"));
  return static_cast<void*>(cuda->stream());
}

namespace cuda {
namespace {

absl::Status CheckDev(const Tensor& t, const char* what, DType dtype, int ndim) {
  RETURN_IF_ERROR(CheckTensor(t, what, dtype, ndim));
  if (t.numel() > 0 && t.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", t.DebugString(), " is not on the GPU"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ElemType> FloatType(const Tensor& t, const char* what) {
  if (t.dtype() == DType::kBF16) return ElemType::kBF16;
  if (t.dtype() == DType::kF32) return ElemType::kF32;
  return absl::InvalidArgumentError(absl::StrCat(what, ": dtype ", std::string(DTypeName(t.dtype())),
                                                 ", expected bf16 or f32"));
}

}  // namespace

CudaBackend::CudaBackend(const CudaBackendOptions& options) : options_(options) {
  batch_invariant_ = options.batch_invariant;
  set_host_kv_interleaved(options.interleaved_host_kv);
  set_host_kv_layer_group(options.host_kv_layer_group);
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(options_.device);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  DestroyGraphs();
  sampler_.reset();
  if (sampled_host_ != nullptr) cudaFreeHost(sampled_host_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  for (PinnedStaging* s : {&batch_staging_, &plan_staging_}) {
    if (s->ready != nullptr) cudaEventDestroy(s->ready);
    if (s->host != nullptr) cudaFreeHost(s->host);
  }
  if (error_flag_host_ != nullptr) cudaFreeHost(error_flag_host_);
  // Device tensors held here release into memory_, which outlives them via shared ownership.
  meta_ = Tensor();
  plan_ = Tensor();
  partials_ = Tensor();
  cublas_workspace_ = Tensor();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Init() {
  graphs_enabled_ = options_.cuda_graphs;
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  cudaDeviceProp prop;
  RETURN_IF_CUDA_ERROR(cudaGetDeviceProperties(&prop, options_.device));
  sm_count_ = prop.multiProcessorCount;
  name_ = absl::StrCat("cuda:", options_.device, " (", prop.name, ")");
  memory_ = std::make_shared<CudaMemory>(options_.device, options_.memory_limit);
  // The compute stream gets the highest priority: when both streams have blocks waiting, the decode's kernels
  // are placed before the elastic gather's (cuda_sparse.cc's copy stream has the lowest).
  int least = 0, greatest = 0;
  RETURN_IF_CUDA_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  RETURN_IF_CUDA_ERROR(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
  RETURN_IF_CUBLAS_ERROR(cublasCreate(&cublas_));
  RETURN_IF_CUBLAS_ERROR(cublasSetStream(cublas_, stream_));
  if (options_.cublas_workspace_bytes > 0) {
    ASSIGN_OR_RETURN(cublas_workspace_, memory_->Alloc(DType::kU8, {options_.cublas_workspace_bytes},
                                                       MemoryKind::kWorkspace));
    RETURN_IF_CUBLAS_ERROR(cublasSetWorkspace(cublas_, cublas_workspace_.data(),
                                              static_cast<size_t>(options_.cublas_workspace_bytes)));
  }
  RETURN_IF_CUDA_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&error_flag_host_), sizeof(int),
                                     cudaHostAllocMapped));
  *error_flag_host_ = 0;
  RETURN_IF_CUDA_ERROR(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_flag_dev_), error_flag_host_, 0));
  for (PinnedStaging* s : {&batch_staging_, &plan_staging_}) {
    RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&s->ready, cudaEventDisableTiming));
  }
  SPC_LOG(INFO) << "cuda backend ready" << Kv("device", name_) << Kv("sms", sm_count_)
                << Kv("memory_limit", options_.memory_limit);
  return absl::OkStatus();
}

absl::Status CudaBackend::set_batch_invariant(bool enabled) {
  if (capturing_) return absl::FailedPreconditionError("set_batch_invariant: a step graph is being recorded");
  if (enabled == batch_invariant_) return absl::OkStatus();
  batch_invariant_ = enabled;
  // Recorded steps hold the other mode's kernels and plans; the current batch must be prepared again.
  DestroyGraphs();
  batch_valid_ = false;
  planned_heads_ = 0;
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncAndCheck() {
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  if (*error_flag_host_ != 0) {
    *error_flag_host_ = 0;
    return absl::OutOfRangeError("embedding: a token id was outside the table (its row was zeroed)");
  }
  return absl::OkStatus();
}

// Also waits for the copy stream, so slot buffers and host KV rows are final for any reader.
absl::Status CudaBackend::Synchronize() {
  RETURN_IF_ERROR(SyncCopyStream());
  return SyncAndCheck();
}

absl::Status CudaBackend::MakeCurrent() {
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  return absl::OkStatus();
}

absl::StatusOr<Tensor> CudaBackend::Alloc(DType dtype, Shape shape, MemoryKind kind) {
  return memory_->Alloc(dtype, std::move(shape), kind);
}

absl::StatusOr<Tensor> CudaBackend::ToDevice(const Tensor& host, DType dtype, MemoryKind kind) {
  if (host.device() != DeviceKind::kCpu) return absl::InvalidArgumentError("ToDevice: source is not a host tensor");
  Tensor src = host;
  if (host.dtype() != dtype) {
    if (!IsFloating(host.dtype()) || !IsFloating(dtype)) {
      return absl::InvalidArgumentError(absl::StrCat("ToDevice: cannot convert ", std::string(DTypeName(host.dtype())),
                                                     " to ", std::string(DTypeName(dtype))));
    }
    // Convert on the host through f32 (weights are loaded once; the copy dominates anyway).
    Tensor f32 = host.dtype() == DType::kF32 ? host : Tensor::HostEmpty(DType::kF32, host.shape());
    if (host.dtype() != DType::kF32) ConvertToF32(host.data(), host.dtype(), f32.as<float>(), host.numel());
    src = Tensor::HostEmpty(dtype, host.shape());
    ConvertFromF32(f32.as<float>(), dtype, src.data(), host.numel());
  }
  ASSIGN_OR_RETURN(Tensor t, Alloc(dtype, host.shape(), kind));
  if (t.nbytes() > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(t.data(), src.data(), t.nbytes(), cudaMemcpyHostToDevice, stream_));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));  // `src` may be a temporary
  }
  return t;
}

absl::Status CudaBackend::CopyToDevice(const Tensor& host, Tensor* device) {
  if (host.dtype() != device->dtype() || host.numel() != device->numel() ||
      device->device() != DeviceKind::kCuda || host.device() != DeviceKind::kCpu) {
    return absl::InvalidArgumentError(absl::StrCat("CopyToDevice: ", host.DebugString(), " into ",
                                                   device->DebugString()));
  }
  if (host.nbytes() == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(device->data(), host.data(), host.nbytes(), cudaMemcpyHostToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::ToHost(const Tensor& device, Tensor* host) {
  if (host->dtype() != device.dtype() || host->numel() != device.numel() ||
      device.device() != DeviceKind::kCuda || host->device() != DeviceKind::kCpu) {
    return absl::InvalidArgumentError(absl::StrCat("ToHost: ", device.DebugString(), " into ",
                                                   host->DebugString()));
  }
  if (device.nbytes() > 0) {
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host->data(), device.data(), device.nbytes(), cudaMemcpyDeviceToHost, stream_));
  }
  return SyncAndCheck();
}

absl::Status CudaBackend::CopyDevice(const Tensor& src, Tensor* dst) {
  if (src.dtype() != dst->dtype() || src.numel() != dst->numel() || src.device() != DeviceKind::kCuda ||
      dst->device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("CopyDevice: ", src.DebugString(), " into ", dst->DebugString()));
  }
  if (src.nbytes() == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dst->data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyHeadRows(const Tensor& src, Tensor* dst, int64_t rows) {
  RETURN_IF_ERROR(CheckCopyHeadRows(src, dst, rows));
  if (src.device() != DeviceKind::kCuda || dst->device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError("CopyHeadRows: tensors must be device or pinned host memory of the GPU");
  }
  if (rows == 0 || src.dim(0) == 0) return absl::OkStatus();
  const size_t row_bytes = src.dim(2) * DTypeSize(src.dtype());
  // One 2D copy: a head's rows are contiguous, heads are strided by each tensor's own row count.
  RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(dst->data(), dst->dim(1) * row_bytes, src.data(), src.dim(1) * row_bytes,
                                         rows * row_bytes, src.dim(0), cudaMemcpyDefault, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyKvPairRows(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) {
  RETURN_IF_ERROR(CheckCopyKvPairRows(k, v, pair, rows));
  if (k->device() != DeviceKind::kCuda || v->device() != DeviceKind::kCuda || pair->device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError("CopyKvPairRows: tensors must be device or pinned host memory of the GPU");
  }
  return CopyKvPairOnStream(KvPairCopyOf(k, v, pair, rows, to_pair));
}

absl::Status CudaBackend::CopyKvPairOnStream(const KvPairCopy& c) {
  // Per (head, K/V) one strided copy on the copy engines: 2 * heads calls, rare (layer moves, prefill staging).
  cudaError_t err = cudaSuccess;
  CopyKvPairRowsOn(c, [&](void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, int64_t height) {
    if (err == cudaSuccess) err = cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, stream_);
  });
  RETURN_IF_CUDA_ERROR(err);
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
  RETURN_IF_ERROR(CheckCopyColumns(src, col_begin, *dst));
  if (src.device() != DeviceKind::kCuda || dst->device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError("CopyColumns: tensors must be on the GPU");
  }
  if (dst->nbytes() == 0) return absl::OkStatus();
  const size_t es = DTypeSize(src.dtype());
  RETURN_IF_CUDA_ERROR(cudaMemcpy2DAsync(dst->data(), dst->dim(1) * es,
                                         static_cast<const char*>(src.data()) + col_begin * es, src.dim(1) * es,
                                         dst->dim(1) * es, src.dim(0), cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Zero(Tensor* t) {
  if (t->device() != DeviceKind::kCuda) return absl::InvalidArgumentError(absl::StrCat("Zero: ", t->DebugString(), " is not on the GPU"));
  if (t->nbytes() == 0) return absl::OkStatus();
  RETURN_IF_CUDA_ERROR(cudaMemsetAsync(t->data(), 0, t->nbytes(), stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Embedding(const Tensor& table, const Tensor& ids, Tensor* out) {
  RETURN_IF_ERROR(CheckDev(table, "embedding table", table.dtype(), 2));
  RETURN_IF_ERROR(CheckDev(ids, "embedding ids", DType::kI32, 1));
  RETURN_IF_ERROR(CheckDev(*out, "embedding out", table.dtype(), 2));
  if (out->dim(0) != ids.dim(0) || out->dim(1) != table.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("embedding out ", ShapeToString(out->shape()), ", expected [",
                                                   ids.dim(0), ", ", table.dim(1), "]"));
  }
  GatherRowsParams p;
  p.table = table.data();
  p.ids = ids.as<int32_t>();
  p.out = out->data();
  p.n = ids.dim(0);
  p.n_rows = table.dim(0);
  p.row_bytes = table.dim(1) * static_cast<int64_t>(DTypeSize(table.dtype()));
  p.error_flag = error_flag_dev_;
  RETURN_IF_CUDA_ERROR(LaunchGatherRows(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) {
  ASSIGN_OR_RETURN(ElemType type, FloatType(x, "rmsnorm x"));
  RETURN_IF_ERROR(CheckDev(x, "rmsnorm x", x.dtype(), 2));
  RETURN_IF_ERROR(CheckDev(w, "rmsnorm weight", x.dtype(), 1));
  RETURN_IF_ERROR(CheckDev(*out, "rmsnorm out", x.dtype(), 2));
  RETURN_IF_ERROR(CheckSameShape(x, *out, "rmsnorm x/out"));
  if (w.dim(0) != x.dim(1)) return absl::InvalidArgumentError("rmsnorm weight size differs from row size");
  RmsNormParams p;
  p.x = x.data();
  p.w = w.data();
  p.out = out->data();
  p.n = x.dim(0);
  p.d = x.dim(1);
  p.eps = eps;
  p.type = type;
  RETURN_IF_CUDA_ERROR(LaunchRmsNorm(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps, Tensor* out) {
  ASSIGN_OR_RETURN(ElemType type, FloatType(x, "add_rmsnorm x"));
  RETURN_IF_ERROR(CheckDev(*residual, "add_rmsnorm residual", x.dtype(), 2));
  RETURN_IF_ERROR(CheckDev(x, "add_rmsnorm x", x.dtype(), 2));
  RETURN_IF_ERROR(CheckDev(w, "add_rmsnorm weight", x.dtype(), 1));
  RETURN_IF_ERROR(CheckDev(*out, "add_rmsnorm out", x.dtype(), 2));
  RETURN_IF_ERROR(CheckSameShape(*residual, x, "add_rmsnorm residual/x"));
  RETURN_IF_ERROR(CheckSameShape(*residual, *out, "add_rmsnorm residual/out"));
  if (w.dim(0) != x.dim(1)) return absl::InvalidArgumentError("add_rmsnorm weight size differs from row size");
  RmsNormParams p;
  p.x = x.data();
  p.residual = residual->data();
  p.w = w.data();
  p.out = out->data();
  p.n = x.dim(0);
  p.d = x.dim(1);
  p.eps = eps;
  p.type = type;
  RETURN_IF_CUDA_ERROR(LaunchRmsNorm(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) {
  RETURN_IF_ERROR(CheckDev(x, "linear x", DType::kBF16, 2));
  RETURN_IF_ERROR(CheckDev(w, "linear weight", DType::kBF16, 2));
  ASSIGN_OR_RETURN(ElemType out_type, FloatType(*out, "linear out"));
  RETURN_IF_ERROR(CheckDev(*out, "linear out", out->dtype(), 2));
  const int64_t n = x.dim(0), k = x.dim(1), m = w.dim(0);
  if (w.dim(1) != k || out->dim(0) != n || out->dim(1) != m) {
    return absl::InvalidArgumentError(absl::StrCat("linear: x ", ShapeToString(x.shape()), " w ",
                                                   ShapeToString(w.shape()), " out ", ShapeToString(out->shape())));
  }
  ElemType bias_type = ElemType::kBF16;
  if (bias != nullptr) {
    ASSIGN_OR_RETURN(bias_type, FloatType(*bias, "linear bias"));
    RETURN_IF_ERROR(CheckDev(*bias, "linear bias", bias->dtype(), 1));
    if (bias->dim(0) != m) return absl::InvalidArgumentError("linear: bias size differs from output features");
  }
  if (n == 0 || m == 0) return absl::OkStatus();
  constexpr int64_t kIntMax = 0x7fffffff;
  if (n > kIntMax || m > kIntMax || k > kIntMax) return absl::InvalidArgumentError("linear: dimension too large");
  LinearOperands ops;
  ops.x = x.data();
  ops.w = w.data();
  ops.bias = bias != nullptr ? bias->data() : nullptr;
  ops.out = out->data();
  ops.n = static_cast<int>(n);
  ops.m = static_cast<int>(m);
  ops.k = static_cast<int>(k);
  ops.out_type = out_type;
  ops.bias_type = bias_type;
  if (batch_invariant_) {
    // One kernel and one order of sums for every row count (kernels/gemm_invariant.h).
    GemmInvariantParams q;
    static_cast<LinearOperands&>(q) = ops;
    RETURN_IF_CUDA_ERROR(LaunchGemmInvariant(q, stream_));
    return absl::OkStatus();
  }
  GemvParams g;
  static_cast<LinearOperands&>(g) = ops;
  if (n <= options_.gemv_max_n && GemvSupported(g)) {
    RETURN_IF_CUDA_ERROR(LaunchGemv(g, stream_));
    return absl::OkStatus();
  }
  // Row-major out[n, m] = x[n, k] · w[m, k]ᵀ is column-major outᵀ[m, n] = wᵀ-op(w) · x.
  const float alpha = 1.0f, beta = 0.0f;
  RETURN_IF_CUBLAS_ERROR(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, g.m, g.n, g.k, &alpha, w.data(),
                                      CUDA_R_16BF, g.k, x.data(), CUDA_R_16BF, g.k, &beta, out->data(),
                                      out_type == ElemType::kBF16 ? CUDA_R_16BF : CUDA_R_32F, g.m,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (bias != nullptr) {
    BiasAddParams b;
    b.out = out->data();
    b.bias = bias->data();
    b.n = n;
    b.m = m;
    b.out_type = out_type;
    b.bias_type = bias_type;
    RETURN_IF_CUDA_ERROR(LaunchBiasAdd(b, stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) {
  RETURN_IF_ERROR(CheckDev(*x, "rope x", DType::kBF16, 3));
  RETURN_IF_ERROR(CheckDev(positions, "rope positions", DType::kI32, 1));
  if (rope.inv_freq == nullptr) return absl::InvalidArgumentError("rope: no inv_freq table");
  RETURN_IF_ERROR(CheckDev(*rope.inv_freq, "rope inv_freq", DType::kF32, -1));
  const int64_t n = x->dim(0), heads = x->dim(1), hd = x->dim(2);
  if (positions.dim(0) != n || hd % 2 != 0 || rope.inv_freq->numel() != hd / 2) {
    return absl::InvalidArgumentError(absl::StrCat("rope: positions ", ShapeToString(positions.shape()),
                                                   " or inv_freq ", ShapeToString(rope.inv_freq->shape()),
                                                   " do not fit x ", ShapeToString(x->shape())));
  }
  RopeParams p;
  p.x = x->data();
  p.positions = positions.as<int32_t>();
  p.inv_freq = rope.inv_freq->as<float>();
  p.n = n;
  p.heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(hd);
  p.interleaved = rope.interleaved;
  p.attention_scaling = rope.attention_scaling;
  RETURN_IF_CUDA_ERROR(LaunchRope(p, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) {
  RETURN_IF_ERROR(CheckDev(gate, "swiglu gate", DType::kBF16, -1));
  RETURN_IF_ERROR(CheckDev(up, "swiglu up", DType::kBF16, -1));
  RETURN_IF_ERROR(CheckDev(*out, "swiglu out", DType::kBF16, -1));
  RETURN_IF_ERROR(CheckSameShape(gate, up, "swiglu gate/up"));
  RETURN_IF_ERROR(CheckSameShape(gate, *out, "swiglu gate/out"));
  SwiGluParams p;
  p.gate = gate.data();
  p.up = up.data();
  p.out = out->data();
  p.numel = gate.numel();
  RETURN_IF_CUDA_ERROR(LaunchSwiGlu(p, stream_));
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace specontext
