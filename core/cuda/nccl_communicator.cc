#include "core/cuda/nccl_communicator.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// libnccl is opened at the first group, not linked: it is ~200 MiB, more than the GPU bundle may carry
// (docs/gpu.md), and a process that never creates a group must not need it. The five entry points below are
// all this file calls.
struct NcclApi {
  decltype(&ncclCommInitAll) CommInitAll = nullptr;
  decltype(&ncclAllReduce) AllReduce = nullptr;
  decltype(&ncclCommDestroy) CommDestroy = nullptr;
  decltype(&ncclCommAbort) CommAbort = nullptr;
  decltype(&ncclGetErrorString) GetErrorString = nullptr;
};

// The library, opened once per process: SPC_NCCL_LIBRARY (a path) when set, else libnccl.so.2 (or libnccl.so)
// from the loader's search path. FailedPrecondition saying what is missing when it cannot be opened.
absl::StatusOr<const NcclApi*> Nccl() {
  static const absl::StatusOr<NcclApi> api = []() -> absl::StatusOr<NcclApi> {
    const char* env = std::getenv("SPC_NCCL_LIBRARY");
    std::string name = env != nullptr && *env != '\0' ? env : "libnccl.so.2";
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr && env == nullptr) {
      name = "libnccl.so";
      lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    }
    if (lib == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("NCCL is not available (", dlerror(),
                                                        "): install libnccl2 or set SPC_NCCL_LIBRARY to its path"));
    }
    NcclApi a;
    bool ok = true;
    auto get = [&](auto& fn, const char* sym) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, sym));
      ok = ok && fn != nullptr;
    };
    get(a.CommInitAll, "ncclCommInitAll");
    get(a.AllReduce, "ncclAllReduce");
    get(a.CommDestroy, "ncclCommDestroy");
    get(a.CommAbort, "ncclCommAbort");
    get(a.GetErrorString, "ncclGetErrorString");
    if (!ok) return absl::FailedPreconditionError(absl::StrCat(name, " lacks an NCCL entry point"));
    return a;  // the library stays open for the process's life
  }();
  if (!api.ok()) return api.status();
  return &*api;
}

absl::Status NcclStatus(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return absl::OkStatus();
  auto api = Nccl();
  return absl::InternalError(absl::StrCat(what, " failed: ", api.ok() ? (*api)->GetErrorString(r) : "?"));
}

#define RETURN_IF_NCCL_ERROR(expr) RETURN_IF_ERROR(NcclStatus((expr), #expr))

// The communicators of one group, for Abort (which ends all of them) and their destruction.
struct NcclGroup {
  const NcclApi* api = nullptr;
  std::vector<ncclComm_t> comms;
  std::atomic<bool> aborted{false};
  std::mutex abort_mu;

  void AbortAll() {
    std::lock_guard<std::mutex> lock(abort_mu);
    if (aborted.exchange(true)) return;
    for (ncclComm_t& c : comms) {
      api->CommAbort(c);
      c = nullptr;
    }
  }
  ~NcclGroup() {
    if (aborted.load()) return;
    for (ncclComm_t c : comms) api->CommDestroy(c);
  }
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<NcclGroup> group, int rank, int device, void* stream)
      : group_(std::move(group)), rank_(rank), device_(device), stream_(static_cast<cudaStream_t>(stream)) {}
  ~NcclCommunicator() override {
    if (scratch_ != nullptr) cudaFree(scratch_);
  }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(group_->comms.size()); }

  absl::Status AllReduceSum(Tensor* inout) override {
    if (inout == nullptr) return absl::InvalidArgumentError("all-reduce: null tensor");
    if (inout->device() != DeviceKind::kCuda) {
      return absl::InvalidArgumentError(absl::StrCat("all-reduce: ", inout->DebugString(), " is not on the GPU"));
    }
    ncclDataType_t type;
    if (inout->dtype() == DType::kF32) {
      type = ncclFloat32;
    } else if (inout->dtype() == DType::kBF16) {
      type = ncclBfloat16;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("all-reduce: ", inout->DebugString(), "; f32 or bf16 expected"));
    }
    RETURN_IF_ERROR(CheckNotAborted());
    RETURN_IF_CUDA_ERROR(cudaSetDevice(device_));
    RETURN_IF_NCCL_ERROR(group_->api->AllReduce(inout->data(), inout->data(), static_cast<size_t>(inout->numel()), type,
                                       ncclSum, group_->comms[rank_], stream_));
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    RETURN_IF_ERROR(CheckNotAborted());
    RETURN_IF_CUDA_ERROR(cudaSetDevice(device_));
    if (scratch_ == nullptr) RETURN_IF_CUDA_ERROR(cudaMalloc(&scratch_, sizeof(float)));
    RETURN_IF_NCCL_ERROR(group_->api->AllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, group_->comms[rank_], stream_));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    return CheckNotAborted();
  }

  void Abort() override { group_->AbortAll(); }

 private:
  absl::Status CheckNotAborted() const {
    if (group_->aborted.load()) return absl::AbortedError("NCCL group aborted");
    return absl::OkStatus();
  }

  std::shared_ptr<NcclGroup> group_;
  const int rank_, device_;
  cudaStream_t stream_;
  void* scratch_ = nullptr;  // one float for Barrier
};

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateNcclGroup(std::span<Backend* const> backends,
                                                                          std::span<const int> devices) {
  if (backends.empty() || backends.size() != devices.size()) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL group: ", backends.size(), " backends for ",
                                                   devices.size(), " devices"));
  }
  std::vector<void*> streams;
  for (Backend* b : backends) {
    ASSIGN_OR_RETURN(void* s, CudaComputeStream(*b));
    streams.push_back(s);
  }
  ASSIGN_OR_RETURN(const NcclApi* api, Nccl());
  // NVLink SHARP / multicast stays off (docs/tensor-parallel.md); a user's explicit setting wins.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  auto group = std::make_shared<NcclGroup>();
  group->api = api;
  group->comms.resize(backends.size());
  const ncclResult_t r = api->CommInitAll(group->comms.data(), static_cast<int>(backends.size()), devices.data());
  if (r != ncclSuccess) {
    group->aborted = true;  // nothing to destroy
    return absl::FailedPreconditionError(absl::StrCat("ncclCommInitAll over ", backends.size(),
                                                      " GPUs failed: ", api->GetErrorString(r)));
  }
  std::vector<std::unique_ptr<Communicator>> out;
  for (size_t i = 0; i < backends.size(); ++i) {
    out.push_back(std::make_unique<NcclCommunicator>(group, static_cast<int>(i), devices[i], streams[i]));
  }
  return out;
}

}  // namespace specontext
