// Where the ranks of tensor parallelism run on a GPU backend (docs/tensor-parallel.md "Ranks are threads"):
// one GPU per rank joined by NCCL, or every rank on one GPU joined through host memory (a test mode). Pure
// logic: the runtime passes the GPU count it sees, so the refusals are testable without CUDA.
#pragma once

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

enum class TensorParallelDevices {
  kSeparate,  // rank r on GPU r, NCCL all-reduces (the serving layout; needs N visible GPUs)
  kShared,    // every rank on GPU 0, all-reduces staged through host memory (CreateHostStagedGroup): tests
};

/// "separate" or "shared" (--tensor-parallel-devices); InvalidArgument naming the flag otherwise.
absl::StatusOr<TensorParallelDevices> ParseTensorParallelDevices(std::string_view name);

/// The CUDA device of each rank of `ranks` (index = rank) when `visible_gpus` devices are visible: 0..N-1 for
/// kSeparate, all 0 for kShared. InvalidArgument when no GPU is visible, or with kSeparate when `ranks`
/// exceeds `visible_gpus` (the message names --tensor-parallel-devices shared, the one-GPU test mode).
absl::StatusOr<std::vector<int>> TensorParallelDeviceIds(int ranks, TensorParallelDevices mode, int visible_gpus);

}  // namespace specontext
