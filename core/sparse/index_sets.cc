#include "core/sparse/index_sets.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/status_macros.h"

namespace specontext {

void IndexSets::Reset(int32_t n_seqs_in, int32_t n_kv_heads_in, int32_t sets_per_seq_in,
                      int32_t budget_in) {
  n_seqs = n_seqs_in;
  n_kv_heads = n_kv_heads_in;
  sets_per_seq = sets_per_seq_in;
  budget = budget_in;
  seq_len.assign(n_seqs, 0);
  indptr.assign(1, 0);
  indices.clear();
}

absl::Status ValidateIndexSetsLayout(const IndexSets& s) {
  if (s.n_seqs < 0 || s.n_kv_heads <= 0 || s.budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("index sets: bad layout n_seqs=", s.n_seqs,
                                                   " n_kv_heads=", s.n_kv_heads, " budget=", s.budget));
  }
  if (s.sets_per_seq != 1 && s.sets_per_seq != s.n_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("index sets: sets_per_seq=", s.sets_per_seq,
                                                   " must be 1 or n_kv_heads=", s.n_kv_heads));
  }
  if (static_cast<int64_t>(s.seq_len.size()) != s.n_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("index sets: seq_len has ", s.seq_len.size(), " entries, want ", s.n_seqs));
  }
  if (static_cast<int64_t>(s.indptr.size()) != static_cast<int64_t>(s.n_sets()) + 1 || s.indptr[0] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("index sets: indptr has ", s.indptr.size(),
                                                   " entries, want ", s.n_sets() + 1, " starting at 0"));
  }
  if (s.indptr.back() != static_cast<int64_t>(s.indices.size())) {
    return absl::InvalidArgumentError(absl::StrCat("index sets: indptr ends at ", s.indptr.back(),
                                                   " but there are ", s.indices.size(), " indices"));
  }
  for (int32_t set = 0; set < s.n_sets(); ++set) {
    const int32_t b = s.indptr[set], e = s.indptr[set + 1];
    if (e < b || e - b > s.budget) {
      return absl::InvalidArgumentError(
          absl::StrCat("index sets: set ", set, " has ", e - b, " positions (budget ", s.budget, ")"));
    }
  }
  return absl::OkStatus();
}

int64_t SortedIntersectionSize(std::span<const int32_t> a, std::span<const int32_t> b) {
  int64_t n = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++n;
      ++i;
      ++j;
    }
  }
  return n;
}

absl::Status ValidateSetPositions(const IndexSets& s, int32_t set) {
  const int32_t b = s.indptr[set], e = s.indptr[set + 1];
  const int32_t seq = set / s.sets_per_seq;
  // Fast check first (every step validates ~B positions per set): strictly ascending is one
  // branch-free pass, and then only the first and last positions need the range check.
  const int32_t* x = s.indices.data();
  bool bad = e > b && (x[b] < 0 || x[e - 1] >= s.seq_len[seq]);
  for (int32_t j = b + 1; j < e; ++j) bad |= x[j] <= x[j - 1];
  if (!bad) return absl::OkStatus();
  for (int32_t j = b; j < e; ++j) {
    const int32_t p = s.indices[j];
    if (p < 0 || p >= s.seq_len[seq]) {
      return absl::InvalidArgumentError(absl::StrCat("index sets: set ", set, " position ", p,
                                                     " outside [0, ", s.seq_len[seq], ")"));
    }
    if (j > b && p <= s.indices[j - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("index sets: set ", set, " positions not strictly ascending at ", p));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateIndexSets(const IndexSets& s) {
  RETURN_IF_ERROR(ValidateIndexSetsLayout(s));
  for (int32_t set = 0; set < s.n_sets(); ++set) RETURN_IF_ERROR(ValidateSetPositions(s, set));
  return absl::OkStatus();
}

absl::Status ValidateBudget(int64_t budget, int64_t sink, int64_t max_context) {
  if (budget < 1) {
    return absl::InvalidArgumentError(absl::StrCat("budget must be at least 1 token, got ", budget));
  }
  if (sink < 0 || sink > budget) {
    return absl::InvalidArgumentError(
        absl::StrCat("sink must be in [0, budget=", budget, "], got ", sink));
  }
  if (max_context > 0 && budget > max_context) {
    return absl::InvalidArgumentError(absl::StrCat("budget ", budget,
                                                   " is larger than the context length ", max_context));
  }
  return absl::OkStatus();
}

int64_t ContextLimit(int64_t max_context, int64_t model_context) {
  return max_context > 0 ? std::min(max_context, model_context) : model_context;
}

absl::Status ValidateMaxContext(int64_t max_context, int64_t budget, int64_t model_context) {
  if (max_context < 0 || max_context > model_context || (max_context > 0 && max_context < budget)) {
    return absl::InvalidArgumentError(absl::StrCat("max context must be 0 (the model's ", model_context,
                                                   ") or in [", std::max<int64_t>(budget, 1), " (the budget), ",
                                                   model_context, "], got ", max_context));
  }
  return absl::OkStatus();
}

absl::Status CheckWithinMaxContext(int64_t capacity, int64_t max_context) {
  if (max_context > 0 && capacity > max_context) {
    return absl::OutOfRangeError(
        absl::StrCat("sequence of ", capacity, " tokens exceeds the decoder's max context ", max_context));
  }
  return absl::OkStatus();
}

absl::Status ValidateSparseDecode(const SparseDecodeDesc& desc, const BatchDesc& batch) {
  if (desc.sets == nullptr) return absl::InvalidArgumentError("sparse decode: no index sets");
  const IndexSets& sets = *desc.sets;
  // Positions still on the device come from the backend's own selection: only the layout is on the host.
  RETURN_IF_ERROR(desc.positions_on_device ? ValidateIndexSetsLayout(sets) : ValidateIndexSets(sets));
  if (sets.n_seqs != static_cast<int32_t>(batch.seqs.size())) {
    return absl::InvalidArgumentError(absl::StrCat("sparse decode: ", sets.n_seqs,
                                                   " sequences of index sets for a batch of ", batch.seqs.size()));
  }
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    const SeqSlice& s = batch.seqs[i];
    if (s.n_tokens != 1 || s.past_len != sets.seq_len[i]) {
      return absl::InvalidArgumentError(absl::StrCat("sparse decode: sequence ", i, " has ", s.n_tokens,
                                                     " new tokens and ", s.past_len, " past, sets chosen from ",
                                                     sets.seq_len[i], " (need 1 token and equal past)"));
    }
  }
  if (!desc.dense_resident.empty() && desc.dense_resident.size() != static_cast<size_t>(sets.n_seqs)) {
    return absl::InvalidArgumentError(absl::StrCat("sparse decode: ", desc.dense_resident.size(),
                                                   " dense_resident flags for ", sets.n_seqs, " sequences"));
  }
  if (!desc.slots.empty() && desc.slots.size() != sets.indices.size()) {
    return absl::InvalidArgumentError(absl::StrCat("sparse decode: ", desc.slots.size(), " slots for ",
                                                   sets.indices.size(), " positions"));
  }
  return absl::OkStatus();
}

}  // namespace specontext
