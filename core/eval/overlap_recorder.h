// The step-to-step overlap of each request's index sets, measured on the sets the engine really used (the
// figure elastic loading depends on: DESIGN.md §1 part 2). ElasticCounters keeps only a cumulative ratio and
// only while layers are offloaded; this records one sample per request and decode step, whatever the tiers:
//   overlap = Σ_sets |S_now ∩ S_last| / Σ_sets |S_now|   over the request's sets (one per KV head, or one)
// A sample is taken only when the request's previous decode step was sparse too (S_last exists) and the
// selection had to choose (some set holds fewer positions than the past: past > budget), since a set that
// holds every past token overlaps by (n-1)/n trivially.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "core/sparse/index_sets.h"

namespace specontext {

class OverlapRecorder {
 public:
  /// One sparse decode step: `sets` and `ids` as SparseDecoder::last_sets() / last_set_ids() give them
  /// right after the step (ids[i] is the request of sequence i).
  void Observe(const IndexSets& sets, std::span<const uint64_t> ids);
  /// Drops a finished request's last sets.
  void Forget(uint64_t id) { last_.erase(id); }
  /// The samples so far, one per (request, step), in [0, 1].
  const std::vector<double>& samples() const { return samples_; }
  void ClearSamples() { samples_.clear(); }

 private:
  struct Last {
    int32_t seq_len = 0;
    std::vector<int32_t> indptr;   // [sets_per_seq + 1], from 0
    std::vector<int32_t> indices;  // the request's positions, set after set
  };
  absl::flat_hash_map<uint64_t, Last> last_;
  std::vector<double> samples_;
};

}  // namespace specontext
