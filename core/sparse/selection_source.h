// Where a sparse decode step's index sets come from (docs/sparse.md "Selection sources"). The
// engine serves with the retrieval head; the other sources exist to measure, through the same code
// path, how much of the perplexity a sparse run loses is the head's choice and how much the
// budget's:
//   head    the retrieval head's top-B per KV head, scored once per step, shared by all layers
//   (DESIGN.md §1); window  StreamingLLM: the `sink` first tokens and the most recent B - sink past
//   tokens, no head needed; oracle  per layer, the exact top-B of the target's own attention of the
//   current query (softmax of
//           q·k over all past tokens per query head, element-wise max over the GQA group:
//           selection.h's rule applied to the layer's real q and K, sink kept): the upper bound of
//           any selection at B;
//   quest   Quest (arXiv 2406.10774), per layer: pages of 16 tokens with the element-wise min and
//   max of their
//           keys, a page scored by Σ_d max(q_d·min_d, q_d·max_d) (an upper bound of q·k over the
//           page), pages ranked per KV head (max over the group's query heads), the top pages taken
//           until B tokens are filled, the pages holding the sink first (core/sparse/quest.h).
// head and window give one set per (sequence, KV head) for the whole step; oracle and quest give
// every layer its own sets, computed inside the layer before its attention
// (Backend::SelectLayerIndexSets).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/selection.h"

namespace specontext {

enum class SelectionSource : uint8_t { kHead, kWindow, kOracle, kQuest };

/// "head", "window", "oracle" or "quest"; InvalidArgument listing them otherwise.
absl::StatusOr<SelectionSource> ParseSelectionSource(std::string_view name);
const char* SelectionSourceName(SelectionSource source);
/// oracle and quest: every layer selects its own sets from its own q and KV.
inline bool IsPerLayerSource(SelectionSource s) {
  return s == SelectionSource::kOracle || s == SelectionSource::kQuest;
}

inline constexpr int32_t kQuestPageSize = 16;  // tokens per page (the paper's)

/// How Backend::SelectLayerIndexSets recomputes the prepared sets of one layer (oracle or quest).
/// The sets' layout (sizes min(B, past) per set, sets per sequence) is the one PrepareSparseDecode
/// was given; only the positions change.
struct LayerSelectionSpec {
  SelectionSource source = SelectionSource::kOracle;  // kOracle or kQuest
  int32_t sink = 1;  // first positions always kept (quest: their pages)
  SelectionMode mode = SelectionMode::kHeadLevel;  // must agree with the prepared sets_per_seq
  int32_t page_size = kQuestPageSize;              // quest only
  float scale = 0.0f;                              // oracle's softmax scale; 0 = 1/sqrt(head_dim)
};

/// StreamingLLM sets for a decode batch: per sequence i with lens[i] past tokens and budget
/// budgets[i], every set holds positions [0, keep) and [len - (k - keep), len) with k = min(budget,
/// len) and keep = min(sink, k) (all past positions when len <= budget). `sets_per_seq` is
/// n_kv_heads (head level) or 1; all sets of a sequence are equal. Reuses `out`'s capacity.
void WindowIndexSets(std::span<const int32_t> lens, std::span<const int32_t> budgets,
                     int32_t n_kv_heads, int32_t sets_per_seq, int32_t sink, IndexSets* out);

}  // namespace specontext
