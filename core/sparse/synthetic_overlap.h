// Benchmark hook (SparseOptions::synthetic_overlap): index sets with a controlled overlap between steps.
//
// With random weights the retrieval head picks near-random sets, so adjacent steps overlap little and the
// elastic loader is measured only at its worst. This rewrites each selected set, after the real selection
// has run (its cost stays in the step), into one that keeps round(overlap · |S|) positions of the same
// (sequence, set)'s previous set and fills the rest with positions not in it, both chosen pseudo-randomly
// from a fixed seed. The first `sink` positions are always kept (they count as kept when the previous set
// had them). Sizes and the ascending, in-range layout of IndexSets are preserved. Not for serving.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/sparse/index_sets.h"

namespace specontext {

/// The previous sets of one sequence, one vector per set of the sequence (empty before its first step).
using PreviousSets = std::vector<std::vector<int32_t>>;

/// The rewrites' random source: splitmix64 with Lemire's unbiased bounded draw. std::mt19937_64 behind
/// std::uniform_int_distribution took about half of a rewrite (1.7 ms of a 32-sequence step on the H100
/// host); this is a handful of multiplies per draw. Not for anything but the benchmark's index streams.
class SyntheticRng {
 public:
  explicit SyntheticRng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [lo, hi] (lo <= hi).
  uint64_t Between(uint64_t lo, uint64_t hi) {
    const uint64_t n = hi - lo + 1;
    if (n == 0) return Next();  // the full 64-bit range
    unsigned __int128 m = static_cast<unsigned __int128>(Next()) * n;
    if (static_cast<uint64_t>(m) < n) {
      const uint64_t threshold = (0 - n) % n;
      while (static_cast<uint64_t>(m) < threshold) m = static_cast<unsigned __int128>(Next()) * n;
    }
    return lo + static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

class SyntheticOverlap {
 public:
  /// `overlap` in [0, 1]; `seed` fixes the choices (same inputs, same sets).
  explicit SyntheticOverlap(double overlap, uint64_t seed = 0x5eed0f5e7ULL)
      : overlap_(overlap), seed_(seed), rng_(seed) {}
  double overlap() const { return overlap_; }

  /// Rewrites every set of `sets` whose sequence i has previous sets (prev[i] holds sets_per_seq vectors),
  /// then stores the sets now in effect into *prev[i] (so a sequence's first step only records the real
  /// selection). prev.size() == sets->n_seqs. InvalidArgument when prev does not fit.
  absl::Status Apply(int32_t sink, std::span<PreviousSets* const> prev, IndexSets* sets);

  /// One set: `size` positions in [0, len), ascending, into *out (replaced): the first min(sink, size)
  /// positions, then round(overlap · size) − (sink positions of `prev`) more from `prev` (ascending), then
  /// fresh positions outside `prev`; positions of `prev` fill in when [0, len) has too few fresh ones.
  void RewriteSet(std::span<const int32_t> prev, int32_t len, int32_t size, int32_t sink, std::vector<int32_t>* out);

 private:
  double overlap_;
  uint64_t seed_;
  SyntheticRng rng_;
  std::vector<std::unique_ptr<SyntheticOverlap>> lanes_;  // Apply: lane i rewrites sequence i
  // Scratch, reused so that a step allocates nothing once grown. Bitmaps over positions [0, len), all
  // zero between calls (only the bits a call set are cleared: O(|set|), not O(len)).
  std::vector<uint64_t> taken_;     // sink, previous set and fresh picks
  std::vector<uint64_t> selected_;  // the new set, for an ordered read-out without sorting
  std::vector<int32_t> pool_, fresh_, next_;
};

}  // namespace specontext
