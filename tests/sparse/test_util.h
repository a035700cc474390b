// Shared helpers of the sparse tests: fresh random data (seed printed on failure).
#pragma once

#include <cstdint>
#include <random>
#include <string>

#include "core/tensor.h"

namespace specontext::testing_sparse {

inline uint32_t FreshSeed() { return std::random_device{}(); }

inline Tensor RandomF32(std::mt19937& rng, Shape shape, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = Tensor::HostEmpty(DType::kF32, std::move(shape));
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = d(rng);
  return t;
}

inline std::string SeedTrace(uint32_t seed) { return "seed=" + std::to_string(seed); }

}  // namespace specontext::testing_sparse

#include <algorithm>
#include <numeric>
#include <vector>

#include "core/sparse/index_sets.h"

namespace specontext::testing_sparse {

/// Random index sets: per set a random subset of [0, seq_len) of size `size` (clamped to the length),
/// or a random size in [0, min(budget, len)] when size < 0.
inline IndexSets RandomSets(std::mt19937& rng, const std::vector<int32_t>& lens, int32_t n_kv, int32_t sets_per_seq,
                            int32_t budget, int32_t size = -1) {
  IndexSets s;
  s.Reset(static_cast<int32_t>(lens.size()), n_kv, sets_per_seq, budget);
  for (size_t i = 0; i < lens.size(); ++i) {
    s.seq_len[i] = lens[i];
    for (int32_t k = 0; k < sets_per_seq; ++k) {
      const int32_t cap = std::min(budget, lens[i]);
      const int32_t n = size < 0 ? static_cast<int32_t>(rng() % (cap + 1)) : std::min(size, cap);
      std::vector<int32_t> all(lens[i]);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(n);
      std::sort(all.begin(), all.end());
      s.indices.insert(s.indices.end(), all.begin(), all.end());
      s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
    }
  }
  return s;
}

}  // namespace specontext::testing_sparse
