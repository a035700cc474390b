// Per-row sampling parameters, shared by the host API (sampling.h) and the kernels (C++17 side).
#pragma once

#include <cstdint>

namespace specontext {

// One row's sampling parameters (plain data, copied to the device as is).
struct RowSampling {
  uint64_t seed = 0;         // per-request seed
  uint64_t step = 0;         // decode step (or any counter): varies the draw between steps
  float temperature = 1.0f;  // <= 0: greedy
  float top_p = 1.0f;        // in (0, 1]
  int32_t top_k = 0;         // 0: no top-k
  // The draw in [0, 1) when >= 0 (the engine passes the request's seeded host generator's draw, so a
  // seed gives the same draws on every backend); < 0: derived from (seed, step).
  float uniform = -1.0f;
};
static_assert(sizeof(RowSampling) == 32);

}  // namespace specontext
