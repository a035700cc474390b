// The Communicator (core/parallel/communicator.h) of CUDA backends: NCCL, one GPU per rank, every rank a
// thread of this process. This header does not include CUDA or NCCL headers.
//
// The group is created with ncclCommInitAll from one thread: all ranks live in this process, so there is
// no unique id to pass between processes and no rendezvous to time out; each rank's thread then drives
// only its own communicator. Collectives are enqueued on the rank backend's compute stream (in stream
// order with the model's kernels; the host does not wait). NVLink multicast (NVLS) stays off: the
// group sets NCCL_NVLS_ENABLE=0 before init unless the environment already sets it.
//
// libnccl is not linked but opened (dlopen) by the first CreateNcclGroup: SPC_NCCL_LIBRARY when set, else
// libnccl.so.2 from the loader's path. So every CUDA binary may carry NCCL support (the GPU bundle cannot
// carry the library itself) and a machine without NCCL fails only when a group is made.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/parallel/communicator.h"

namespace specontext {

/// One communicator per rank: rank r uses `backends[r]` (made by MakeCudaBackend on `devices[r]`). The
/// backend's ops do not select their device: each rank's thread makes its device current (cudaSetDevice)
/// before it drives its backend and communicator.
/// AllReduceSum takes device tensors (f32 or bf16) of that backend; Barrier also waits on the host for
/// the rank's stream. Abort aborts every communicator of the group (ncclCommAbort): kernels of pending
/// collectives return and later calls fail with Aborted. FailedPrecondition when libnccl cannot be opened or
/// NCCL cannot initialise.
absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateNcclGroup(std::span<Backend* const> backends,
                                                                          std::span<const int> devices);

}  // namespace specontext
