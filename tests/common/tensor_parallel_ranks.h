// Runs one function per tensor-parallel rank, each on its own thread, as the engine's ranks run: rank r makes
// backends[r] current first; a rank that fails aborts the group so that the others return instead of waiting
// in a collective.
#pragma once

#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/model/transformer.h"
#include "core/parallel/communicator.h"

namespace specontext::testing {

/// out[r] = run(backends[r], TensorParallel{r, size, comms[r]}), or the error of making backends[r] current.
template <typename T, typename Run>
std::vector<absl::StatusOr<T>> RunOnRanks(std::span<Backend* const> backends,
                                          std::span<const std::unique_ptr<Communicator>> comms, Run run) {
  const int size = static_cast<int>(comms.size());
  std::vector<absl::StatusOr<T>> out(size, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      if (absl::Status s = backends[r]->MakeCurrent(); !s.ok()) {
        out[r] = s;
      } else {
        out[r] = run(backends[r], TensorParallel{r, size, comms[r].get()});
      }
      if (!out[r].ok()) comms[r]->Abort();
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

}  // namespace specontext::testing
