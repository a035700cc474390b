// CudaBackend::SampleTokens: token selection on the GPU (core/cuda/sampling.h kernels), downloading
// only the chosen ids. An all-greedy batch runs the argmax kernel; otherwise CudaSampler runs with
// each row's draw taken from the request's host generator (TokenSampling::uniform), so a seed gives
// the same draws as the host sampler (core/model/sampler.h).
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/sampling.h"
#include "core/status_macros.h"

namespace specontext::cuda {

absl::Status CudaBackend::SampleTokens(const Tensor& logits, std::span<const TokenSampling> rows,
                                       std::span<int32_t> tokens) {
  const int64_t n = static_cast<int64_t>(rows.size());
  if (logits.dtype() != DType::kF32 || logits.ndim() != 2 || logits.device() != DeviceKind::kCuda ||
      logits.dim(0) != n || static_cast<int64_t>(tokens.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("SampleTokens: logits ", logits.DebugString(), " for ", n,
                                                   " rows and ", tokens.size(), " outputs"));
  }
  bool greedy = true;
  for (int64_t i = 0; i < n; ++i) {
    const TokenSampling& r = rows[i];
    if (!std::isfinite(r.temperature) || r.temperature < 0 || !(r.top_p > 0 && r.top_p <= 1) || r.top_k < 0 ||
        !(r.uniform >= 0 && r.uniform < 1)) {
      return absl::InvalidArgumentError(absl::StrCat("SampleTokens: row ", i, " has temperature ", r.temperature,
                                                     ", top_p ", r.top_p, ", top_k ", r.top_k, ", uniform ",
                                                     r.uniform));
    }
    greedy = greedy && (r.temperature == 0.0f || r.top_k == 1);
  }
  if (n == 0) return absl::OkStatus();
  if (n > sampled_capacity_) {
    const int cap = static_cast<int>(std::max<int64_t>(n, 32));
    sampler_.reset();
    if (sampled_host_ != nullptr) {
      RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
      cudaFreeHost(sampled_host_);
      sampled_host_ = nullptr;
    }
    sampled_capacity_ = 0;
    ASSIGN_OR_RETURN(sampled_, Alloc(DType::kI32, {cap}, MemoryKind::kOther));
    ASSIGN_OR_RETURN(std::unique_ptr<CudaSampler> sampler, CudaSampler::Create(*this, cap));
    sampler_ = std::shared_ptr<CudaSampler>(std::move(sampler));
    RETURN_IF_CUDA_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&sampled_host_), sizeof(int32_t) * cap,
                                       cudaHostAllocDefault));
    sampled_capacity_ = cap;
  }
  Tensor out(sampled_.data(), DType::kI32, {n}, DeviceKind::kCuda, sampled_.storage());
  if (greedy) {
    RETURN_IF_ERROR(CudaArgmax(*this, logits, &out));
  } else {
    std::vector<RowSampling> params(n);
    for (int64_t i = 0; i < n; ++i) {
      params[i].temperature = rows[i].temperature;
      params[i].top_k = rows[i].top_k;
      params[i].top_p = rows[i].top_p;
      params[i].uniform = rows[i].uniform;
    }
    RETURN_IF_ERROR(static_cast<CudaSampler*>(sampler_.get())->Sample(logits, params, &out));
  }
  RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(sampled_host_, out.data(), sizeof(int32_t) * n, cudaMemcpyDeviceToHost,
                                       stream_));
  RETURN_IF_ERROR(SyncAndCheck());
  std::memcpy(tokens.data(), sampled_host_, sizeof(int32_t) * n);
  return absl::OkStatus();
}

}  // namespace specontext::cuda
