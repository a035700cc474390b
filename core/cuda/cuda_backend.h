// The CUDA backend: bf16 weights, activations and KV cache with f32 accumulation; GEMMs through
// cuBLAS (or a custom GEMV for very small batches), own kernels for everything else.
//
// All work is enqueued on one non-default compute stream owned by the backend. Ops allocate
// nothing themselves; PrepareBatch uploads the batch metadata once per forward into buffers that
// are reused (and only grown) across forwards, so a decode step can later be captured in a graph.
// This header does not include CUDA headers: model code may include it.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "core/backend.h"

namespace specontext {

struct CudaBackendOptions {
  int device = 0;             // CUDA device ordinal
  int64_t memory_limit = 0;   // bytes the backend may allocate (--gpu-memory-limit); 0 = no limit
  // Linear with at most this many rows uses the custom GEMV kernel instead of cuBLAS (0 = never,
  // at most 8). 1 from cuda_kernel_bench on the H100 (2026-11-24): at n = 1 the GEMV beats cuBLAS on
  // every Llama-3.1-8B projection (e.g. gate_up 84.7 vs 91.8 us, lm_head 343.9 vs 379.8 us); at n = 8
  // cuBLAS wins.
  int gemv_max_n = 1;
  int64_t cublas_workspace_bytes = int64_t{32} << 20;  // fixed cuBLAS workspace (graph capture)
  // Record dense decode steps as CUDA graphs (Backend::RunStepGraph); Backend::set_step_graphs changes it.
  bool cuda_graphs = true;
  // Batch-invariant mode (Backend::set_batch_invariant changes it): Linear through one tensor-core GEMM
  // kernel for every row count (kernels/gemm_invariant.cu, no GEMV, no cuBLAS), no fused LinearSwiGlu, and
  // the split of decode and sparse attention fixed by each sequence's own length, never by the batch.
  bool batch_invariant = false;
  // Host tiers of offloaded layers with a token's K and V rows side by side (SequenceKv "Host layout");
  // Backend::set_host_kv_interleaved changes it.
  bool interleaved_host_kv = true;
  // Offloaded layers per interleaved host allocation (SequenceKv "Host layout": layer groups, gathered
  // together so a token's rows of 4 layers of an 8B model, 2 KiB, come from one host page; behind the H100
  // machine's IOMMU the gather rate is set by the pages it touches). Backend::set_host_kv_layer_group.
  int host_kv_layer_group = 4;
};

// Creates the backend on `options.device`. Fails with FailedPrecondition when no CUDA device is
// usable (no driver, no GPU, bad ordinal) and ResourceExhausted when the limit is too small.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);

// Number of CUDA devices the runtime sees (0 without a driver or GPU). Never fails.
int CudaDeviceCount();

// Free memory of CUDA device `device` now (cudaMemGetInfo; 0 when it cannot be read). Leaves the calling
// thread's current device as it was.
int64_t CudaDeviceFreeBytes(int device);

// The compute stream of a backend made by MakeCudaBackend, as a `cudaStream_t` cast to void*, for
// CUDA code outside the backend (sampling, graph capture). InvalidArgument for other backends.
absl::StatusOr<void*> CudaComputeStream(Backend& backend);

}  // namespace specontext
