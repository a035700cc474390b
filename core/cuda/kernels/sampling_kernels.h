// Launchers of the argmax and sampling kernels (see core/cuda/sampling.h for the semantics).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda/row_sampling.h"

namespace specontext::cuda {

struct SamplingParams {
  const float* logits = nullptr;     // [batch, vocab]
  const RowSampling* rows = nullptr;  // [batch] (sampling only)
  int32_t* out = nullptr;            // [batch]
  int batch = 0;
  int vocab = 0;
};

cudaError_t LaunchArgmax(const SamplingParams& p, cudaStream_t stream);
cudaError_t LaunchSample(const SamplingParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
