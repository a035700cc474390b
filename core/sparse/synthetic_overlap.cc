#include "core/sparse/synthetic_overlap.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/parallel/parallel_for.h"

namespace specontext {
namespace {

// Moves `k` elements chosen uniformly at random to the front of v (partial Fisher-Yates).
void ChooseFront(std::vector<int32_t>& v, size_t k, SyntheticRng& rng) {
  for (size_t i = 0; i < k && i < v.size(); ++i) std::swap(v[i], v[rng.Between(i, v.size() - 1)]);
}

bool TestBit(const std::vector<uint64_t>& b, int32_t p) { return (b[p >> 6] >> (p & 63)) & 1; }
void SetBit(std::vector<uint64_t>& b, int32_t p) { b[p >> 6] |= uint64_t{1} << (p & 63); }
void ClearBit(std::vector<uint64_t>& b, int32_t p) { b[p >> 6] &= ~(uint64_t{1} << (p & 63)); }

}  // namespace

void SyntheticOverlap::RewriteSet(std::span<const int32_t> prev, int32_t len, int32_t size, int32_t sink,
                                  std::vector<int32_t>* out) {
  out->clear();
  size = std::max(0, std::min(size, len));
  const int32_t s0 = std::max(0, std::min({sink, size, len}));
  const size_t words = (static_cast<size_t>(std::max(len, 0)) + 63) / 64;
  if (taken_.size() < words) {
    taken_.resize(words, 0);
    selected_.resize(words, 0);
  }
  for (int32_t p = 0; p < s0; ++p) {
    out->push_back(p);
    SetBit(taken_, p);
  }
  int32_t sink_in_prev = 0;
  pool_.clear();
  for (int32_t p : prev) {
    if (p < s0) {
      ++sink_in_prev;
    } else if (p < len) {
      pool_.push_back(p);
      SetBit(taken_, p);
    }
  }
  const int32_t want = static_cast<int32_t>(std::llround(overlap_ * size));
  const size_t from_prev = static_cast<size_t>(
      std::clamp<int64_t>(int64_t{want} - sink_in_prev, 0, std::min<int64_t>(pool_.size(), size - s0)));
  ChooseFront(pool_, from_prev, rng_);
  out->insert(out->end(), pool_.begin(), pool_.begin() + from_prev);
  const int64_t fresh_needed = size - static_cast<int64_t>(out->size());
  const int64_t fresh_available = (len - s0) - static_cast<int64_t>(pool_.size());
  if (fresh_needed > 0 && fresh_available <= 2 * fresh_needed) {
    // Dense case (len is O(size) here): enumerate the fresh positions and pick among them (all of them
    // when too few).
    fresh_.clear();
    for (int32_t p = s0; p < len; ++p) {
      if (!TestBit(taken_, p)) fresh_.push_back(p);
    }
    const size_t take = static_cast<size_t>(std::min<int64_t>(fresh_needed, fresh_.size()));
    ChooseFront(fresh_, take, rng_);
    out->insert(out->end(), fresh_.begin(), fresh_.begin() + take);
    // Not enough fresh positions: the rest comes from the previous set's unused positions.
    const size_t more = static_cast<size_t>(fresh_needed) - take;
    out->insert(out->end(), pool_.begin() + from_prev, pool_.begin() + from_prev + more);
  } else if (fresh_needed > 0) {
    for (int64_t added = 0; added < fresh_needed;) {
      const int32_t p = static_cast<int32_t>(rng_.Between(s0, len - 1));
      if (!TestBit(taken_, p)) {
        SetBit(taken_, p);
        out->push_back(p);
        ++added;
      }
    }
  }
  // Every bit set above belongs to a position of *out or of pool_: clear those, O(|set|).
  for (int32_t p : *out) ClearBit(taken_, p);
  for (int32_t p : pool_) ClearBit(taken_, p);
  if (words <= 4 * out->size()) {
    // Ascending read-out of a bitmap: O(len / 64 + |set|), cheaper than sorting when len is not much
    // larger than the set (the usual case: B = 2K of S = 34K is 532 words for 2K positions).
    for (int32_t p : *out) SetBit(selected_, p);
    int32_t* o = out->data();  // same count out as in (the positions are distinct)
    for (size_t w = 0; w < words; ++w) {
      uint64_t x = selected_[w];
      if (x == 0) continue;
      selected_[w] = 0;
      for (; x != 0; x &= x - 1) *o++ = static_cast<int32_t>(w * 64 + std::countr_zero(x));
    }
  } else {
    std::sort(out->begin(), out->end());
  }
}

absl::Status SyntheticOverlap::Apply(int32_t sink, std::span<PreviousSets* const> prev, IndexSets* sets) {
  if (static_cast<int64_t>(prev.size()) != sets->n_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("synthetic overlap: ", prev.size(), " previous-set records for ",
                                                   sets->n_seqs, " sequences"));
  }
  for (int32_t i = 0; i < sets->n_seqs; ++i) {
    if (!prev[i]->empty() && static_cast<int32_t>(prev[i]->size()) != sets->sets_per_seq) {
      return absl::InvalidArgumentError(absl::StrCat("synthetic overlap: sequence ", i, " recorded ",
                                                     prev[i]->size(), " sets, the step has ", sets->sets_per_seq));
    }
  }
  while (static_cast<int32_t>(lanes_.size()) < sets->n_seqs) {
    const uint64_t lane = lanes_.size() + 1;
    lanes_.push_back(std::make_unique<SyntheticOverlap>(overlap_, seed_ + lane * 0x9E3779B97F4A7C15ULL));
  }
  const int64_t cost = int64_t{sets->sets_per_seq} * std::max<int32_t>(1, sets->budget) * 32;
  ParallelFor(sets->n_seqs, cost, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      SyntheticOverlap& lane = *lanes_[i];
      PreviousSets& p = *prev[i];
      const bool first = p.empty();
      p.resize(sets->sets_per_seq);
      for (int32_t s = 0; s < sets->sets_per_seq; ++s) {
        const int32_t set = static_cast<int32_t>(i) * sets->sets_per_seq + s, begin_at = sets->indptr[set];
        const int32_t size = sets->indptr[set + 1] - begin_at;
        if (!first) {
          // Same size, so the CSR layout stays and the set is rewritten in place; the rewrite becomes the
          // previous set by a swap (the old one's buffer is the next rewrite's scratch).
          lane.RewriteSet(p[s], sets->seq_len[i], size, sink, &lane.next_);
          std::copy(lane.next_.begin(), lane.next_.end(), sets->indices.begin() + begin_at);
          p[s].swap(lane.next_);
        } else {
          p[s].assign(sets->indices.begin() + begin_at, sets->indices.begin() + begin_at + size);
        }
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace specontext
