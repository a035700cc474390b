// Status plumbing for CUDA runtime and cuBLAS calls: every call's return code becomes an
// absl::Status naming the call and its source line, so failures on the GPU machine are readable.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace specontext::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  const absl::StatusCode code = err == cudaErrorMemoryAllocation ? absl::StatusCode::kResourceExhausted
                                                                 : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, " failed: ", cudaGetErrorString(err), " (", file, ":",
                                         line, ")"));
}

inline absl::Status CublasStatus(cublasStatus_t err, const char* what, const char* file, int line) {
  if (err == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, " failed: cuBLAS status ", static_cast<int>(err), " (",
                                          cublasGetStatusString(err), ") (", file, ":", line, ")"));
}

}  // namespace specontext::cuda

// RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(...));
#define RETURN_IF_CUDA_ERROR(expr)                                                               \
  do {                                                                                           \
    ::absl::Status spc_cuda_status_ = ::specontext::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__); \
    if (!spc_cuda_status_.ok()) return spc_cuda_status_;                                         \
  } while (0)

#define RETURN_IF_CUBLAS_ERROR(expr)                                                             \
  do {                                                                                           \
    ::absl::Status spc_cublas_status_ =                                                          \
        ::specontext::cuda::CublasStatus((expr), #expr, __FILE__, __LINE__);                     \
    if (!spc_cublas_status_.ok()) return spc_cublas_status_;                                     \
  } while (0)

// After a kernel launch: reports launch-configuration errors (not asynchronous faults).
#define RETURN_IF_LAUNCH_ERROR(what) \
  RETURN_IF_CUDA_ERROR((static_cast<void>(what), cudaGetLastError()))
