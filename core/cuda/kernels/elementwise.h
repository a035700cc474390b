// Row and element kernels: embedding/row gather, RMSNorm (+ fused residual add), RoPE, SwiGLU,
// bias add. Each launch takes its params by value, runs on `stream` and returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specontext::cuda {

enum class ElemType : uint8_t { kF32, kBF16 };

// out[i, :] = table[ids[i], :], rows of `row_bytes` bytes. An id outside [0, n_rows) writes a zero
// row and sets *error_flag to 1 (the host reports it at the next Synchronize/ToHost).
struct GatherRowsParams {
  const void* table = nullptr;   // [n_rows, row_bytes]
  const int32_t* ids = nullptr;  // [n]
  void* out = nullptr;           // [n, row_bytes]
  int64_t n = 0;
  int64_t n_rows = 0;
  int64_t row_bytes = 0;
  int* error_flag = nullptr;  // device-visible (mapped) int
};
cudaError_t LaunchGatherRows(const GatherRowsParams& p, cudaStream_t stream);

// out = x / rms(x) * w per row; when `residual` is set: residual += x first, then normalise it.
// x, residual, out [n, d] and w [d] all of type `type`.
struct RmsNormParams {
  const void* x = nullptr;
  void* residual = nullptr;  // null for plain RMSNorm
  const void* w = nullptr;
  void* out = nullptr;
  int64_t n = 0;
  int64_t d = 0;
  float eps = 1e-5f;
  ElemType type = ElemType::kBF16;
};
cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);

// Rotates bf16 x [n, heads, head_dim] in place: angle = positions[i] * inv_freq[j] (f32),
// cos/sin scaled by attention_scaling; pairs (j, j + hd/2) or, interleaved, (2j, 2j + 1).
struct RopeParams {
  void* x = nullptr;
  const int32_t* positions = nullptr;  // [n]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  int64_t n = 0;
  int heads = 0;
  int head_dim = 0;
  bool interleaved = false;
  float attention_scaling = 1.0f;
};
cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream);

// out = silu(gate) * up, bf16 [numel].
struct SwiGluParams {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t numel = 0;
};
cudaError_t LaunchSwiGlu(const SwiGluParams& p, cudaStream_t stream);

// out[i, j] += bias[j].  out [n, m] of out_type, bias [m] of bias_type.
struct BiasAddParams {
  void* out = nullptr;
  const void* bias = nullptr;
  int64_t n = 0;
  int64_t m = 0;
  ElemType out_type = ElemType::kBF16;
  ElemType bias_type = ElemType::kBF16;
};
cudaError_t LaunchBiasAdd(const BiasAddParams& p, cudaStream_t stream);

}  // namespace specontext::cuda
