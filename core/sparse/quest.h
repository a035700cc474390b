// Quest page selection (arXiv 2406.10774, "Query-aware sparsity"), the CPU reference of the `quest`
// selection source (core/sparse/selection_source.h); the CUDA kernels
// (core/cuda/kernels/layer_selection.cu) follow the same contract and are tested against it.
//
// A layer's keys of one KV head are cut into pages of P tokens from position 0 (the last page may
// be partial). Each page keeps the element-wise min m and max M of its keys; for a query q the
// page's criticality is
//   U = Σ_d max(q_d · m_d, q_d · M_d)  >= q · k for every key k of the page
// (computed here from the keys themselves, which equals what an incrementally maintained page table
// holds). As in Quest, where the decode step appends its token's KV to the page table before it
// estimates, the current token's key (row `len`) counts in its page's min and max when
// `with_current` is set: the page of the most recent tokens then scores at least q · k_current,
// which is what keeps local context in the set. The current token itself is never a set position
// (attention adds it separately). A set's page score is the max of U over the set's query heads
// (the GQA group, or all heads at batch level); a NaN score counts as -inf. Pages are taken in this
// order: the pages holding the first `keep` positions (keep = min(sink, k)) in ascending order,
// then the others by score, higher first, ties to the lower page; each page contributes its first
// min(past positions in it, k - taken) positions until the set holds k = min(B, len). Departures
// from the paper's evaluation (mit-han-lab/Quest, evaluation/quest_attention.py): it ran the first
// two layers dense and selected per query head (MHA models); here every layer selects and a KV
// head's group shares one set, as every source of this engine at the same budget.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/selection.h"

namespace specontext {

/// U of every page of one query head against one KV head's keys: q [hd], k rows [0, len) at k + t *
/// hd, out [ceil(len / page_size)]. f32 accumulation in dimension order.
void QuestPageScores(const float* q, const float* k, int64_t len, int64_t hd, int32_t page_size,
                     float* out);

/// The positions (ascending, appended to `out`) that the rule above takes from pages scored
/// `page_scores` [ceil(rows / page_size)], pages over rows [0, rows) (rows = len, or len + 1 with
/// the current token), for a set of `k` past positions (clamped to [0, len]) with `sink` first
/// positions kept.
void QuestPagesToPositions(const float* page_scores, int32_t len, int32_t rows, int32_t page_size,
                           int32_t k, int32_t sink, std::vector<int32_t>* out);

/// Quest's sets for a batch, the layout of SelectTopB (sets_per_seq n_kv or 1 by options.mode,
/// sizes min(budget, len), per-sequence budget overrides). With `with_current`, row `len` of every
/// k_cache holds the current token's key (capacity > len). options.scale is not used (it does not
/// change the order). InvalidArgument for bad shapes or options, page_size < 1.
absl::Status QuestSelectTopB(std::span<const SelectionQuery> batch, const SelectionOptions& options,
                             int32_t page_size, bool with_current, IndexSets* out);

}  // namespace specontext
