#include "core/cuda/sampling.h"

#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels/sampling_kernels.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status CheckLogits(const Tensor& logits, const Tensor& out) {
  if (logits.dtype() != DType::kF32 || logits.ndim() != 2 || logits.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: logits ", logits.DebugString(),
                                                   ", expected f32 [batch, vocab] on the GPU"));
  }
  if (out.dtype() != DType::kI32 || out.numel() != logits.dim(0) || out.device() != DeviceKind::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: out ", out.DebugString(), ", expected i32 [",
                                                   logits.dim(0), "] on the GPU"));
  }
  if (logits.dim(1) <= 0 || logits.dim(1) > 0x7fffffff || logits.dim(0) > 0x7fffffff) {
    return absl::InvalidArgumentError("sampling: bad vocabulary size");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaArgmax(Backend& backend, const Tensor& logits, Tensor* out) {
  RETURN_IF_ERROR(CheckLogits(logits, *out));
  ASSIGN_OR_RETURN(void* stream, CudaComputeStream(backend));
  cuda::SamplingParams p;
  p.logits = logits.as<float>();
  p.out = out->as<int32_t>();
  p.batch = static_cast<int>(logits.dim(0));
  p.vocab = static_cast<int>(logits.dim(1));
  RETURN_IF_CUDA_ERROR(cuda::LaunchArgmax(p, static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaSampler>> CudaSampler::Create(Backend& backend, int max_batch) {
  if (max_batch <= 0) return absl::InvalidArgumentError("CudaSampler: max_batch must be positive");
  ASSIGN_OR_RETURN(void* stream, CudaComputeStream(backend));
  std::unique_ptr<CudaSampler> s(new CudaSampler());
  s->backend_ = &backend;
  s->stream_ = stream;
  s->max_batch_ = max_batch;
  ASSIGN_OR_RETURN(s->params_, backend.Alloc(DType::kU8, {int64_t{max_batch} * int64_t{sizeof(RowSampling)}},
                                              MemoryKind::kOther));
  RETURN_IF_CUDA_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&s->staging_), sizeof(RowSampling) * max_batch,
                                     cudaHostAllocDefault));
  cudaEvent_t ev;
  RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  s->staged_ = ev;
  return s;
}

CudaSampler::~CudaSampler() {
  if (staged_ != nullptr) {
    cudaEventSynchronize(static_cast<cudaEvent_t>(staged_));
    cudaEventDestroy(static_cast<cudaEvent_t>(staged_));
  }
  if (staging_ != nullptr) cudaFreeHost(staging_);
}

absl::Status CudaSampler::Sample(const Tensor& logits, std::span<const RowSampling> rows, Tensor* out) {
  RETURN_IF_ERROR(CheckLogits(logits, *out));
  const int64_t batch = logits.dim(0);
  if (static_cast<int64_t>(rows.size()) != batch) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: ", rows.size(), " parameter rows for batch ", batch));
  }
  if (batch > max_batch_) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: batch ", batch, " exceeds max_batch ", max_batch_));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!(rows[i].top_p > 0.0f && rows[i].top_p <= 1.0f) || rows[i].top_k < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sampling: row ", i, " has top_p ", rows[i].top_p,
                                                     " (need (0, 1]) or top_k ", rows[i].top_k, " < 0"));
    }
  }
  if (batch == 0) return absl::OkStatus();
  auto stream = static_cast<cudaStream_t>(stream_);
  auto ev = static_cast<cudaEvent_t>(staged_);
  RETURN_IF_CUDA_ERROR(cudaEventSynchronize(ev));  // the previous upload has left staging_
  std::memcpy(staging_, rows.data(), sizeof(RowSampling) * rows.size());
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(params_.data(), staging_, sizeof(RowSampling) * rows.size(),
                                       cudaMemcpyHostToDevice, stream));
  RETURN_IF_CUDA_ERROR(cudaEventRecord(ev, stream));
  cuda::SamplingParams p;
  p.logits = logits.as<float>();
  p.rows = static_cast<const RowSampling*>(params_.data());
  p.out = out->as<int32_t>();
  p.batch = static_cast<int>(batch);
  p.vocab = static_cast<int>(logits.dim(1));
  RETURN_IF_CUDA_ERROR(cuda::LaunchSample(p, stream));
  return absl::OkStatus();
}

}  // namespace specontext
