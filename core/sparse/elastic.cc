#include "core/sparse/elastic.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/parallel/parallel_for.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

int32_t HeadsCovered(int32_t sets_per_seq, int32_t n_kv_heads) { return sets_per_seq == 1 ? n_kv_heads : 1; }

// MapPtr: const SlotMap* or SlotMap* (plan and apply check the same things without copying the span).
// `positions`: also check every set's positions (the plan checks them itself, set by set, in its parallel
// loop: a step's 2 MB of positions are then read once, while they are in cache for planning).
template <typename MapPtr>
absl::Status CheckMaps(std::span<MapPtr const> maps, const IndexSets& sets, bool positions = true) {
  RETURN_IF_ERROR(positions ? ValidateIndexSets(sets) : ValidateIndexSetsLayout(sets));
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
    : budget_(budget),
      tokens_(std::max(0, n_sets)),
      slots_(std::max(0, n_sets)),
      next_tokens_(std::max(0, n_sets)),
      next_slots_(std::max(0, n_sets)) {}

int32_t SlotMap::SlotOf(int32_t set, int32_t token) const {
  const auto& t = tokens_[set];
  auto it = std::lower_bound(t.begin(), t.end(), token);
  return it != t.end() && *it == token ? slots_[set][it - t.begin()] : -1;
}

void SlotMap::Clear() {
  for (auto& t : tokens_) t.clear();
  for (auto& s : slots_) s.clear();
  ++generation_;
  next_plan_ = 0;
}

absl::StatusOr<ElasticPlan> PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets) {
  ElasticPlan plan;
  RETURN_IF_ERROR(PlanElasticLoads(maps, sets, &plan));
  return plan;
}

namespace {

// Per-thread scratch of PlanSet: grows to the largest position / budget seen, never shrinks.
struct PlanScratch {
  std::vector<int32_t> slot_of;  // [> largest position] slot of a resident position, -1 elsewhere
  std::vector<int32_t> free_slots;
  std::vector<uint8_t> used;
};

// Plans one set: slots[j] for every position of S_now, the copies of S_now \ S_last written to `copies`
// (room for |S_now|), returns how many; `kept` gets |S_now ∩ S_last|.
int32_t PlanSet(std::span<const int32_t> now, std::span<const int32_t> last_tok, std::span<const int32_t> last_slot,
                int32_t seq_len, int32_t budget, PlanScratch& scr, int32_t* slots, RowCopy* copies, int64_t* kept) {
  const int32_t extent = std::max(seq_len, last_tok.empty() ? 0 : last_tok.back() + 1);
  if (static_cast<int32_t>(scr.slot_of.size()) < extent) scr.slot_of.resize(extent, -1);
  if (static_cast<int32_t>(scr.used.size()) < budget) {
    scr.used.resize(budget);
    scr.free_slots.resize(budget);
  }
  // Kept tokens keep their slots: S_last scattered into a position->slot array, read back at S_now's
  // positions (no hashing, no data-dependent branches), then cleared again. Raw pointers in locals:
  // the byte stores to `used` could alias anything reached through the vectors.
  int32_t* const slot_at = scr.slot_of.data();
  uint8_t* const used_at = scr.used.data();
  int32_t* const free_at = scr.free_slots.data();
  const int32_t* const now_at = now.data();
  const int32_t n_now = static_cast<int32_t>(now.size()), n_last = static_cast<int32_t>(last_tok.size());
  for (int32_t a = 0; a < n_last; ++a) slot_at[last_tok[a]] = last_slot[a];
  std::memset(used_at, 0, budget);
  int64_t k = 0;
  for (int32_t j = 0; j < n_now; ++j) {
    const int32_t sl = slot_at[now_at[j]];
    slots[j] = sl;
    used_at[sl >= 0 ? sl : 0] |= static_cast<uint8_t>(sl >= 0);
    k += sl >= 0;
  }
  for (int32_t a = 0; a < n_last; ++a) slot_at[last_tok[a]] = -1;
  // New tokens take the free slots in ascending order (freed by S_last \ S_now, or never used);
  // |S_now| <= budget, so there are enough.
  int32_t n_free = 0;
  for (int32_t sl = 0; sl < budget; ++sl) {
    free_at[n_free] = sl;
    n_free += used_at[sl] == 0;
  }
  int32_t n_copies = 0;
  for (int32_t j = 0; j < n_now; ++j) {
    const bool fresh = slots[j] < 0;
    const int32_t sl = fresh ? free_at[n_copies] : slots[j];
    slots[j] = sl;
    copies[n_copies] = {now_at[j], sl};
    n_copies += fresh;
  }
  *kept = k;
  return n_copies;
}

}  // namespace

absl::Status PlanElasticLoads(std::span<const SlotMap* const> maps, const IndexSets& sets, ElasticPlan* out) {
  RETURN_IF_ERROR(CheckMaps(maps, sets, /*positions=*/false));
  ElasticPlan& plan = *out;
  CopyList& cl = plan.copies;
  cl.n_seqs = sets.n_seqs;
  cl.n_kv_heads = sets.n_kv_heads;
  cl.sets_per_seq = sets.sets_per_seq;
  cl.budget = sets.budget;
  const int32_t n_sets = sets.n_seqs * sets.sets_per_seq;
  // Each set first writes its copies into scratch at its own offset (indptr: at most one copy per position
  // of S_now), then they are packed into cl.copies in set order. The scratch only grows (sizing cl.copies
  // up to |S_now| and back down every step value-initialised megabytes per step at 32 x 8 x 2048).
  if (plan.scratch_copies.size() < sets.indices.size()) plan.scratch_copies.resize(sets.indices.size());
  plan.slots.resize(sets.indices.size());
  plan.generations.resize(sets.n_seqs);
  plan.scratch_set_copies.resize(n_sets);
  std::vector<int64_t> kept(n_sets);  // small: one entry per set
  static std::atomic<uint64_t> next_id{1};
  plan.id = next_id.fetch_add(1, std::memory_order_relaxed);
  const int64_t per_seq = int64_t{sets.sets_per_seq} * std::max<int32_t>(1, sets.budget) * 8;
  // The first set (in set order, whatever the thread count) whose positions are bad: its error is returned.
  std::atomic<int32_t> first_bad{n_sets};
  ParallelFor(sets.n_seqs, per_seq, [&](int64_t begin, int64_t end) {
    static thread_local PlanScratch scr;
    for (int64_t i = begin; i < end; ++i) {
      const SlotMap& map = *maps[i];
      plan.generations[i] = map.generation();
      for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
        const int32_t set = static_cast<int32_t>(i) * sets.sets_per_seq + s;
        if (!ValidateSetPositions(sets, set).ok()) {
          int32_t cur = first_bad.load();
          while (set < cur && !first_bad.compare_exchange_weak(cur, set)) {
          }
          return;  // the rest of this range comes later in set order
        }
        const std::span<const int32_t> now = sets.SetPositions(set);
        int32_t* const slots = plan.slots.data() + sets.indptr[set];
        plan.scratch_set_copies[set] = PlanSet(now, map.tokens(s), map.slots(s), sets.seq_len[i], map.budget(),
                                               scr, slots, plan.scratch_copies.data() + sets.indptr[set], &kept[set]);
        // The state ApplyElasticPlan commits, written while it is in cache (the commit becomes a swap).
        map.next_tokens_[s].assign(now.begin(), now.end());
        map.next_slots_[s].assign(slots, slots + now.size());
      }
      map.next_plan_ = plan.id;
    }
  });
  if (first_bad.load() < n_sets) {
    for (SlotMap const* m : maps) m->next_plan_ = 0;  // whatever was planned is not this plan's
    return ValidateSetPositions(sets, first_bad.load());
  }
  const int32_t heads = HeadsCovered(sets.sets_per_seq, sets.n_kv_heads);
  cl.copy_ptr.assign(1, 0);
  cl.full_reload_rows = 0;
  plan.set_rows = 0;
  plan.kept_rows = 0;
  int64_t n_copies = 0;
  for (int32_t set = 0; set < n_sets; ++set) n_copies += plan.scratch_set_copies[set];
  cl.copies.resize(n_copies);
  n_copies = 0;
  for (int32_t set = 0; set < n_sets; ++set) {
    const int32_t n = plan.scratch_set_copies[set];
    if (n > 0) {
      std::memcpy(cl.copies.data() + n_copies, plan.scratch_copies.data() + sets.indptr[set], n * sizeof(RowCopy));
    }
    n_copies += n;
    cl.copy_ptr.push_back(static_cast<int32_t>(n_copies));
    const int64_t rows = sets.indptr[set + 1] - sets.indptr[set];
    plan.kept_rows += kept[set];
    plan.set_rows += rows;
    cl.full_reload_rows += rows * heads;
  }
  cl.head_rows = n_copies * heads;
  return absl::OkStatus();
}

absl::Status ApplyElasticPlan(const ElasticPlan& plan, const IndexSets& sets, std::span<SlotMap* const> maps) {
  if (plan.slots.size() != sets.indices.size() || plan.generations.size() != maps.size() ||
      plan.copies.copy_ptr.size() != sets.indptr.size() || static_cast<int64_t>(maps.size()) != sets.n_seqs) {
    RETURN_IF_ERROR(CheckMaps(maps, sets));
    return absl::InvalidArgumentError("elastic: the plan was not made from these index sets");
  }
  bool swap_all = plan.id != 0;
  for (size_t i = 0; i < maps.size(); ++i) {
    if (maps[i] == nullptr || maps[i]->n_sets() != sets.sets_per_seq) return CheckMaps(maps, sets);
    if (maps[i]->generation() != plan.generations[i]) {
      return absl::FailedPreconditionError(absl::StrCat("elastic: slot map of seq ", i,
                                                        " changed since the plan was made (stale plan)"));
    }
    swap_all = swap_all && maps[i]->next_plan_ == plan.id;
  }
  if (swap_all) {
    // The back buffers hold exactly this plan's state (written from the same sets while planning).
    for (SlotMap* map : maps) {
      map->tokens_.swap(map->next_tokens_);
      map->slots_.swap(map->next_slots_);
      map->next_plan_ = 0;
      ++map->generation_;
    }
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(CheckMaps(maps, sets));
  ParallelFor(sets.n_seqs, int64_t{sets.sets_per_seq} * std::max<int32_t>(1, sets.budget), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      SlotMap& map = *maps[i];
      for (int32_t s = 0; s < sets.sets_per_seq; ++s) {
        const int32_t set = static_cast<int32_t>(i) * sets.sets_per_seq + s;
        const int32_t b = sets.indptr[set], e = sets.indptr[set + 1];
        map.tokens_[s].assign(sets.indices.begin() + b, sets.indices.begin() + e);
        map.slots_[s].assign(plan.slots.begin() + b, plan.slots.begin() + e);
      }
      map.next_plan_ = 0;
      ++map.generation_;
    }
  });
  return absl::OkStatus();
}

CopyList FullReloadCopies(const IndexSets& sets, std::span<const int32_t> slots) {
  CopyList cl;
  FullReloadCopies(sets, slots, &cl);
  return cl;
}

void FullReloadCopies(const IndexSets& sets, std::span<const int32_t> slots, CopyList* out) {
  CopyList& cl = *out;
  cl.Reset(sets.n_seqs, sets.n_kv_heads, sets.sets_per_seq, sets.budget);
  cl.copy_ptr.assign(sets.indptr.begin(), sets.indptr.end());
  const size_t n = std::min(sets.indices.size(), slots.size());
  cl.copies.resize(n);
  for (size_t j = 0; j < n; ++j) cl.copies[j] = {sets.indices[j], slots[j]};
  cl.head_rows = static_cast<int64_t>(cl.copies.size()) * HeadsCovered(sets.sets_per_seq, sets.n_kv_heads);
  cl.full_reload_rows = cl.head_rows;
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
