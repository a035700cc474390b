// Host memory the backend did not allocate, used like AllocPinnedHost memory: the services' kvstore
// segment holds the host KV tier of offloaded layers (generator/kvstore_host_tier.h). The segment is
// page-locked and mapped once (cudaHostRegister, mapped + portable); tensors over parts of it carry the
// device-mapped pointer, which with unified addressing equals the host pointer, so the same conventions as
// AllocPinnedHost hold: one pointer serves host code, the append kernel and the elastic gather kernel
// (which reads the rows over PCIe).
#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/status_macros.h"

namespace specontext::cuda {
namespace {

constexpr uintptr_t kPageBytes = 4096;

bool Overlaps(const char* a, size_t an, const char* b, size_t bn) { return a < b + bn && b < a + an; }

}  // namespace

absl::Status CudaBackend::RegisterHostMemory(void* ptr, size_t bytes) {
  char* p = static_cast<char*>(ptr);
  if (p == nullptr || bytes == 0) return absl::InvalidArgumentError("RegisterHostMemory: empty region");
  if (reinterpret_cast<uintptr_t>(p) % kPageBytes != 0) {
    return absl::InvalidArgumentError("RegisterHostMemory: the region must start on a page boundary");
  }
  for (const auto& [base, n] : registered_host_) {
    if (Overlaps(p, bytes, base, n)) {
      return absl::AlreadyExistsError(absl::StrCat("RegisterHostMemory: [", reinterpret_cast<uintptr_t>(p), ", +",
                                                   bytes, ") overlaps a registered region"));
    }
  }
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  const cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("cudaHostRegister of ", bytes, " bytes failed: ",
                                                     cudaGetErrorString(err)));
  }
  void* dev = nullptr;
  absl::Status st = CudaStatus(cudaHostGetDevicePointer(&dev, p, 0), "cudaHostGetDevicePointer", __FILE__, __LINE__);
  if (st.ok() && dev != p) {
    st = absl::FailedPreconditionError(
        "RegisterHostMemory: registered memory has a different device address (no unified addressing)");
  }
  if (!st.ok()) {
    cudaHostUnregister(p);
    return st;
  }
  registered_host_.emplace_back(p, bytes);
  return absl::OkStatus();
}

absl::Status CudaBackend::UnregisterHostMemory(void* ptr) {
  auto it = std::find_if(registered_host_.begin(), registered_host_.end(),
                         [ptr](const auto& r) { return r.first == static_cast<char*>(ptr); });
  if (it == registered_host_.end()) {
    return absl::NotFoundError("UnregisterHostMemory: no region was registered at this address");
  }
  // Kernels of either stream may still read or write the region.
  RETURN_IF_ERROR(SyncCopyStream());
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  RETURN_IF_CUDA_ERROR(cudaHostUnregister(ptr));
  registered_host_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<Tensor> CudaBackend::WrapHostTensor(void* host, DType dtype, Shape shape,
                                                   std::shared_ptr<void> storage) {
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat("WrapHostTensor: negative dimension in ", ShapeToString(shape)));
    }
  }
  const char* p = static_cast<const char*>(host);
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  const bool inside = std::any_of(registered_host_.begin(), registered_host_.end(), [&](const auto& r) {
    return p >= r.first && p + bytes <= r.first + r.second;
  });
  if (p == nullptr || !inside) {
    return absl::FailedPreconditionError(absl::StrCat("WrapHostTensor: ", bytes,
                                                      " bytes not inside a region given to RegisterHostMemory"));
  }
  void* dev = nullptr;
  RETURN_IF_CUDA_ERROR(cudaHostGetDevicePointer(&dev, host, 0));
  if (dev != host) {
    return absl::FailedPreconditionError("WrapHostTensor: mapped host memory has a different device address (no UVA)");
  }
  return Tensor(host, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
}

}  // namespace specontext::cuda
