#include "core/eval/overlap_recorder.h"

namespace specontext {

void OverlapRecorder::Observe(const IndexSets& sets, std::span<const uint64_t> ids) {
  if (static_cast<int64_t>(ids.size()) != sets.n_seqs || !ValidateIndexSetsLayout(sets).ok()) return;
  const int32_t per = sets.sets_per_seq;
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    const int32_t seq_len = sets.seq_len[i];
    const int32_t begin = sets.indptr[i * per], end = sets.indptr[(i + 1) * per];
    bool chose = false;
    for (int32_t s = i * per; s < (i + 1) * per; ++s) chose |= sets.indptr[s + 1] - sets.indptr[s] < seq_len;
    Last& last = last_[ids[i]];
    if (chose && last.seq_len + 1 == seq_len && static_cast<int32_t>(last.indptr.size()) == per + 1) {
      int64_t kept = 0;
      for (int32_t s = 0; s < per; ++s) {
        const std::span<const int32_t> now = sets.SetPositions(i * per + s);
        const std::span<const int32_t> before(last.indices.data() + last.indptr[s], last.indptr[s + 1] - last.indptr[s]);
        kept += SortedIntersectionSize(now, before);
      }
      if (end > begin) samples_.push_back(static_cast<double>(kept) / static_cast<double>(end - begin));
    }
    last.seq_len = seq_len;
    last.indptr.resize(per + 1);
    for (int32_t s = 0; s <= per; ++s) last.indptr[s] = sets.indptr[i * per + s] - begin;
    last.indices.assign(sets.indices.begin() + begin, sets.indices.begin() + end);
  }
}

}  // namespace specontext
