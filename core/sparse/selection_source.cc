#include "core/sparse/selection_source.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::StatusOr<SelectionSource> ParseSelectionSource(std::string_view name) {
  if (name == "head") return SelectionSource::kHead;
  if (name == "window") return SelectionSource::kWindow;
  if (name == "oracle") return SelectionSource::kOracle;
  if (name == "quest") return SelectionSource::kQuest;
  return absl::InvalidArgumentError(absl::StrCat(
      "selection source must be head, window, oracle or quest, got \"", std::string(name), "\""));
}

const char* SelectionSourceName(SelectionSource source) {
  switch (source) {
    case SelectionSource::kHead:
      return "head";
    case SelectionSource::kWindow:
      return "window";
    case SelectionSource::kOracle:
      return "oracle";
    case SelectionSource::kQuest:
      return "quest";
  }
  return "?";
}

void WindowIndexSets(std::span<const int32_t> lens, std::span<const int32_t> budgets,
                     int32_t n_kv_heads, int32_t sets_per_seq, int32_t sink, IndexSets* out) {
  int32_t max_budget = 1;
  for (int32_t b : budgets) max_budget = std::max(max_budget, b);
  out->Reset(static_cast<int32_t>(lens.size()), n_kv_heads, sets_per_seq, max_budget);
  for (size_t i = 0; i < lens.size(); ++i) {
    const int32_t len = lens[i];
    const int32_t k = std::max(0, std::min(budgets[i], len));
    const int32_t keep = std::max(0, std::min(sink, k));
    out->seq_len[i] = len;
    for (int32_t s = 0; s < sets_per_seq; ++s) {
      for (int32_t p = 0; p < keep; ++p) out->indices.push_back(p);
      for (int32_t p = len - (k - keep); p < len; ++p) out->indices.push_back(p);
      out->indptr.push_back(static_cast<int32_t>(out->indices.size()));
    }
  }
}

}  // namespace specontext
