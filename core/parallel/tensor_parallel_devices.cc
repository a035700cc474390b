#include "core/parallel/tensor_parallel_devices.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::StatusOr<TensorParallelDevices> ParseTensorParallelDevices(std::string_view name) {
  if (name == "separate") return TensorParallelDevices::kSeparate;
  if (name == "shared") return TensorParallelDevices::kShared;
  return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel-devices expects separate or shared, got \"",
                                                 std::string(name), "\""));
}

absl::StatusOr<std::vector<int>> TensorParallelDeviceIds(int ranks, TensorParallelDevices mode, int visible_gpus) {
  if (ranks < 1) return absl::InvalidArgumentError("--tensor-parallel must be at least 1");
  if (visible_gpus < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel ", ranks, " on the CUDA backend: no GPU is visible"));
  }
  std::vector<int> devices(ranks, 0);
  if (mode == TensorParallelDevices::kShared) return devices;
  if (ranks > visible_gpus) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tensor-parallel ", ranks, " needs one GPU per rank but ", visible_gpus, visible_gpus == 1 ? " is" : " are",
        " visible; pass --tensor-parallel-devices shared to run every rank on GPU 0 (a test mode: each all-reduce "
        "goes through host memory)"));
  }
  for (int r = 0; r < ranks; ++r) devices[r] = r;
  return devices;
}

}  // namespace specontext
