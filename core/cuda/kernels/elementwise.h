// Row and element kernels: embedding/row gather, RMSNorm (+ fused residual add), RoPE, SwiGLU,
// bias add. Each launch takes its params by value, runs on `stream` and returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

namespace specontext::cuda {

// Programmatic dependent launch (PDL, sm_90). The decode step of a small model is a chain of short kernels
// (a 1B layer: ~9, each a few microseconds), so the gap between one kernel's last block and the next one's
// first useful load is a large share of the step. Kernels launched with LaunchPdl may start while the
// kernel before them in the stream is still running: before PdlWait() they may only read memory nothing in
// flight writes (the GEMV's weights), after it everything the previous kernels wrote is visible. Every
// LaunchPdl kernel calls PdlWait() in every block before any other global access, and PdlTrigger() early so
// that the kernel after it may launch as soon as all of its blocks are running. A kernel launched without the
// attribute (or after a copy) waits for its predecessor as usual; PdlWait() is then a no-op.
// Only launches recorded into a CUDA graph (stream capture) take the attribute: launched op by op,
// cudaLaunchKernelEx with it cost measurably more host time (the retrieval head's ~12 launches of a 1B
// decode step: 0.074 -> 0.113 ms, H100) than the GPU saved. SPC_PDL=0 in the environment turns it off (A/B).
enum : int { kPdlOff = 0, kPdlOn = 1 };
inline int PdlMode() {
  static const int mode = [] {
    const char* e = std::getenv("SPC_PDL");
    return static_cast<int>(e != nullptr && std::string(e) == "0" ? kPdlOff : kPdlOn);
  }();
  return mode;
}

// Whether a launch on `stream` now takes the PDL attribute (PdlMode() on and the stream capturing).
inline bool PdlActive(cudaStream_t stream) {
  if (PdlMode() == kPdlOff) return false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusActive;
}

#if defined(__CUDACC__)
__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlTrigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization attribute (see above).
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = PdlActive(stream) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
#endif

// Whether p allows 16-byte vector accesses (host side: which kernel a launch may use).
inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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
