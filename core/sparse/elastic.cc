#include "core/sparse/elastic.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

int32_t HeadsCovered(int32_t sets_per_seq, int32_t n_kv_heads) { return sets_per_seq == 1 ? n_kv_heads : 1; }

absl::Status CheckMaps(std::span<const SlotMap* const> maps, const IndexSets& sets) {
  RETURN_IF_ERROR(ValidateIndexSets(sets));
  if (static_cast<int64_t>(maps.size()) != sets.n_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("elastic: ", maps.size(), " slot maps for ", sets.n_seqs, " sequences"));
  }
  for (size_t i = 0; i < maps.size(); ++i) {
    if (maps[i] == nullptr || maps[i]->n_sets() != sets.sets_per_seq) {
      return absl::InvalidArgumentError(absl::StrCat("elastic: slot map of seq ", i, " has ",
                                                     maps[i] ? maps[i]->n_sets() : -1, " sets, the index sets ",
                                                     sets.sets_per_seq, " per sequence"));
    }
    for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
      const int64_t n = sets.SetPositions(static_cast<int32_t>(i) * sets.sets_per_seq + s).size();
      if (n > maps[i]->budget()) {
        return absl::InvalidArgumentError(absl::StrCat("elastic: seq ", i, " set ", s, " has ", n,
                                                       " positions, more than its ", maps[i]->budget(), " slots"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

SlotMap::SlotMap(int32_t n_sets, int32_t budget)
    : budget_(budget), tokens_(std::max(0, n_sets)), slots_(std::max(0, n_sets)) {}

int32_t SlotMap::SlotOf(int32_t set, int32_t token) const {
  const auto& t = tokens_[set];
  auto it = std::lower_bound(t.begin(), t.end(), token);
  return it != t.end() && *it == token ? slots_[set][it - t.begin()] : -1;
}

void SlotMap::Clear() {
  for (auto& t : tokens_) t.clear();
  for (auto& s : slots_) s.clear();
  ++generation_;
}

absl::StatusOr<ElasticPlan> PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets) {
  RETURN_IF_ERROR(CheckMaps(maps, sets));
  ElasticPlan plan;
  CopyList& cl = plan.copies;
  cl.n_seqs = sets.n_seqs;
  cl.n_kv_heads = sets.n_kv_heads;
  cl.sets_per_seq = sets.sets_per_seq;
  cl.budget = sets.budget;
  cl.copy_ptr.assign(1, 0);
  plan.slots.assign(sets.indices.size(), -1);
  const int32_t heads = HeadsCovered(sets.sets_per_seq, sets.n_kv_heads);
  std::vector<uint8_t> used;
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    const SlotMap& map = *maps[i];
    plan.generations.push_back(map.generation());
    used.assign(map.budget(), 0);
    for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
      const int32_t set = i * sets.sets_per_seq + s;
      std::span<const int32_t> now = sets.SetPositions(set);
      std::span<const int32_t> last_tok = map.tokens(s);
      std::span<const int32_t> last_slot = map.slots(s);
      std::fill(used.begin(), used.end(), 0);
      // Merge the two ascending lists: kept tokens keep their slots.
      size_t a = 0;
      for (size_t j = 0; j < now.size(); ++j) {
        while (a < last_tok.size() && last_tok[a] < now[j]) ++a;
        if (a < last_tok.size() && last_tok[a] == now[j]) {
          plan.slots[sets.indptr[set] + j] = last_slot[a];
          used[last_slot[a]] = 1;
          ++plan.kept_rows;
        }
      }
      // New tokens take the free slots in ascending order (freed by S_last \ S_now, or never used).
      int32_t next_free = 0;
      for (size_t j = 0; j < now.size(); ++j) {
        int32_t& slot = plan.slots[sets.indptr[set] + j];
        if (slot >= 0) continue;
        while (used[next_free]) ++next_free;  // |S_now| <= budget, so a free slot exists
        slot = next_free;
        used[next_free] = 1;
        cl.copies.push_back({now[j], slot});
      }
      cl.copy_ptr.push_back(static_cast<int32_t>(cl.copies.size()));
      plan.set_rows += static_cast<int64_t>(now.size());
      cl.full_reload_rows += static_cast<int64_t>(now.size()) * heads;
    }
  }
  cl.head_rows = static_cast<int64_t>(cl.copies.size()) * heads;
  return plan;
}

absl::Status ApplyElasticPlan(const ElasticPlan& plan, const IndexSets& sets, std::span<SlotMap* const> maps) {
  std::vector<const SlotMap*> cmaps(maps.begin(), maps.end());
  RETURN_IF_ERROR(CheckMaps(cmaps, sets));
  if (plan.slots.size() != sets.indices.size() || plan.generations.size() != maps.size() ||
      plan.copies.copy_ptr.size() != sets.indptr.size()) {
    return absl::InvalidArgumentError("elastic: the plan was not made from these index sets");
  }
  for (size_t i = 0; i < maps.size(); ++i) {
    if (maps[i]->generation() != plan.generations[i]) {
      return absl::FailedPreconditionError(absl::StrCat("elastic: slot map of seq ", i,
                                                        " changed since the plan was made (stale plan)"));
    }
  }
  for (int32_t i = 0; i < sets.n_seqs; ++i) {
    SlotMap& map = *maps[i];
    for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
      const int32_t set = i * sets.sets_per_seq + s;
      const int32_t b = sets.indptr[set], e = sets.indptr[set + 1];
      map.tokens_[s].assign(sets.indices.begin() + b, sets.indices.begin() + e);
      map.slots_[s].assign(plan.slots.begin() + b, plan.slots.begin() + e);
    }
    ++map.generation_;
  }
  return absl::OkStatus();
}

CopyList FullReloadCopies(const IndexSets& sets, std::span<const int32_t> slots) {
  CopyList cl;
  cl.n_seqs = sets.n_seqs;
  cl.n_kv_heads = sets.n_kv_heads;
  cl.sets_per_seq = sets.sets_per_seq;
  cl.budget = sets.budget;
  cl.copy_ptr = sets.indptr;
  cl.copies.reserve(sets.indices.size());
  for (size_t j = 0; j < sets.indices.size() && j < slots.size(); ++j) cl.copies.push_back({sets.indices[j], slots[j]});
  cl.head_rows = static_cast<int64_t>(cl.copies.size()) * HeadsCovered(sets.sets_per_seq, sets.n_kv_heads);
  cl.full_reload_rows = cl.head_rows;
  return cl;
}

void ElasticCounters::AddPlan(const ElasticPlan& plan) {
  ++steps;
  set_rows += plan.set_rows;
  kept_rows += plan.kept_rows;
}

absl::Status ExecuteCopiesCpu(const CopyList& cl, std::span<const LayerRows> seqs, ElasticCounters* counters) {
  if (static_cast<int64_t>(seqs.size()) != cl.n_seqs ||
      static_cast<int64_t>(cl.copy_ptr.size()) != static_cast<int64_t>(cl.n_seqs) * cl.sets_per_seq + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("elastic copy: ", seqs.size(), " layer views for a copy list of ", cl.n_seqs, " sequences"));
  }
  int64_t row_bytes = 0;
  for (int32_t i = 0; i < cl.n_seqs; ++i) {
    const LayerRows& r = seqs[i];
    const Tensor* all[] = {&r.host_k, &r.host_v, &r.slot_k, &r.slot_v};
    for (const Tensor* t : all) {
      if (t->empty() || t->ndim() != 3 || t->dim(0) != cl.n_kv_heads || t->dtype() != r.host_k.dtype() ||
          t->dim(2) != r.host_k.dim(2)) {
        return absl::InvalidArgumentError(absl::StrCat("elastic copy: seq ", i, " tensor ", t->DebugString(),
                                                       " does not fit [", cl.n_kv_heads, ", rows, head_dim]"));
      }
    }
    if (r.host_v.dim(1) != r.host_k.dim(1) || r.slot_v.dim(1) != r.slot_k.dim(1)) {
      return absl::InvalidArgumentError(absl::StrCat("elastic copy: seq ", i, " K and V shapes differ: ",
                                                     r.host_k.DebugString(), " ", r.host_v.DebugString(), " ",
                                                     r.slot_k.DebugString(), " ", r.slot_v.DebugString()));
    }
    const int64_t cap = r.host_k.dim(1), n_slots = r.slot_k.dim(1);
    for (int32_t c = cl.copy_ptr[i * cl.sets_per_seq]; c < cl.copy_ptr[(i + 1) * cl.sets_per_seq]; ++c) {
      const RowCopy& rc = cl.copies[c];
      if (rc.token < 0 || rc.token >= cap || rc.slot < 0 || rc.slot >= n_slots) {
        return absl::InvalidArgumentError(absl::StrCat("elastic copy: seq ", i, " copy token ", rc.token,
                                                       " -> slot ", rc.slot, " outside capacity ", cap,
                                                       " / slots ", n_slots));
      }
    }
    const int64_t rb = r.host_k.dim(2) * static_cast<int64_t>(DTypeSize(r.host_k.dtype()));
    if (i > 0 && rb != row_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("elastic copy: seq ", i, " rows of ", rb,
                                                     " bytes differ from seq 0's ", row_bytes));
    }
    row_bytes = rb;
  }
  const int32_t heads = HeadsCovered(cl.sets_per_seq, cl.n_kv_heads);
  for (int32_t i = 0; i < cl.n_seqs; ++i) {
    const LayerRows& r = seqs[i];
    const int64_t cap = r.host_k.dim(1), slots = r.slot_k.dim(1);
    for (int32_t s = 0; s < cl.sets_per_seq; ++s) {
      const int32_t set = i * cl.sets_per_seq + s;
      for (int32_t c = cl.copy_ptr[set]; c < cl.copy_ptr[set + 1]; ++c) {
        const RowCopy& rc = cl.copies[c];
        for (int32_t hh = 0; hh < heads; ++hh) {
          const int64_t g = heads == 1 ? s : hh;
          const int64_t src = (g * cap + rc.token) * row_bytes, dst = (g * slots + rc.slot) * row_bytes;
          std::memcpy(static_cast<uint8_t*>(r.slot_k.data()) + dst,
                      static_cast<const uint8_t*>(r.host_k.data()) + src, row_bytes);
          std::memcpy(static_cast<uint8_t*>(r.slot_v.data()) + dst,
                      static_cast<const uint8_t*>(r.host_v.data()) + src, row_bytes);
        }
      }
    }
  }
  if (counters != nullptr) {
    counters->rows_loaded += 2 * cl.head_rows;
    counters->bytes_loaded += 2 * cl.head_rows * row_bytes;
    counters->bytes_full_reload += 2 * cl.full_reload_rows * row_bytes;
  }
  return absl::OkStatus();
}

}  // namespace specontext
