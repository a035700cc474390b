// Reclaiming dead owners, repairing after a holder of the mutex died, stats, inspection and the
// invariant checker. Recovery never trusts the block links: BlockMeta::sequence_slot is the
// source of truth, and the free list is rebuilt from it.
#include <cstring>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "kvstore/kv_store.h"
#include "kvstore/kv_store_lock.h"
#include "kvstore/process_liveness.h"

namespace specontext::kvstore {

void KvStore::RebuildFreeList() {
  uint32_t head = kNone;
  uint64_t count = 0;
  for (uint64_t i = geometry_.block_count; i > 0; --i) {
    const uint32_t b = static_cast<uint32_t>(i - 1);
    BlockMeta& m = meta_[b];
    if (m.sequence_slot != kNone &&
        (m.sequence_slot >= geometry_.max_sequences || !seqs_[m.sequence_slot].in_use)) {
      m.sequence_slot = kNone;
    }
    if (m.sequence_slot == kNone) {
      m.next = head;
      head = b;
      ++count;
    }
  }
  state_->free_head = head;
  state_->free_count = count;
}

uint64_t KvStore::DropSequences(const std::vector<char>& drop) {
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
    if (drop[s]) seqs_[s].in_use = 0;
  }
  uint64_t freed = 0;
  for (uint64_t b = 0; b < geometry_.block_count; ++b) {
    const uint32_t slot = meta_[b].sequence_slot;
    if (slot != kNone && (slot >= geometry_.max_sequences || !seqs_[slot].in_use)) ++freed;
  }
  RebuildFreeList();
  return freed;
}

bool KvStore::OwnerAlive(uint32_t slot) const {
  const OwnerRecord& r = owners_[slot];
  if (!r.in_use) return false;
  // No shortcut for our own pid: a restarted container's generator often gets the same pid as its
  // predecessor, and only the start time tells them apart.
  return IsProcessAlive(r.pid, r.start_ticks);
}

bool KvStore::SequenceOrphaned(const SequenceRecord& s) const {
  return s.owner_slot >= geometry_.max_owners || !owners_[s.owner_slot].in_use ||
         owners_[s.owner_slot].generation != s.owner_generation;
}

ReclaimReport KvStore::ReclaimDeadLocked() {
  ReclaimReport report;
  state_->op_in_progress = kOpReclaim;
  for (uint32_t o = 0; o < geometry_.max_owners; ++o) {
    if (owners_[o].in_use && !OwnerAlive(o)) {
      owners_[o].in_use = 0;
      ++report.owners;
    }
  }
  std::vector<char> drop(geometry_.max_sequences, 0);
  bool any = report.owners > 0;
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
    if (seqs_[s].in_use && SequenceOrphaned(seqs_[s])) {
      drop[s] = 1;
      ++report.sequences;
      any = true;
    }
  }
  if (any) report.blocks = DropSequences(drop);
  state_->reclaimed_owners += report.owners;
  state_->reclaimed_sequences += report.sequences;
  state_->reclaimed_blocks += report.blocks;
  state_->op_in_progress = kOpNone;
  return report;
}

absl::StatusOr<ReclaimReport> KvStore::ReclaimDead() {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  return ReclaimDeadLocked();
}

void KvStore::RepairAfterOwnerDeath() {
  std::vector<char> drop(geometry_.max_sequences, 0);
  const uint32_t op = state_->op_in_progress;
  const uint32_t slot = state_->op_sequence_slot;
  bool owner_alive = false;
  bool dropped = false;
  if ((op == kOpAllocate || op == kOpFree) && slot < geometry_.max_sequences &&
      seqs_[slot].in_use) {
    // The interrupted sequence's links and counts cannot be trusted: drop it. If its owner still
    // lives (only a thread died) it gets NotFound rather than silently wrong blocks.
    drop[slot] = 1;
    dropped = true;
    owner_alive = !SequenceOrphaned(seqs_[slot]) && OwnerAlive(seqs_[slot].owner_slot);
  }
  // Always runs: also relinks a free list the dead holder may have left half updated.
  const uint64_t freed = DropSequences(drop);
  if (dropped) {
    if (owner_alive) {
      ++state_->repaired_sequences;
    } else {
      ++state_->reclaimed_sequences;
      state_->reclaimed_blocks += freed;
    }
  }
  state_->op_in_progress = kOpNone;
  // The holder is most likely a dead process: take its other sequences back now too.
  ReclaimDeadLocked();
}

KvStoreStats KvStore::StatsLocked() const {
  KvStoreStats st;
  st.total_blocks = geometry_.block_count;
  st.free_blocks = state_->free_count;
  st.used_blocks = st.total_blocks - std::min(st.free_blocks, st.total_blocks);
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) st.sequences += seqs_[s].in_use != 0;
  for (uint32_t o = 0; o < geometry_.max_owners; ++o) st.owners += owners_[o].in_use != 0;
  st.reclaimed_blocks = state_->reclaimed_blocks;
  st.reclaimed_sequences = state_->reclaimed_sequences;
  st.reclaimed_owners = state_->reclaimed_owners;
  st.repaired_sequences = state_->repaired_sequences;
  st.lock_recoveries = state_->lock_recoveries;
  return st;
}

absl::StatusOr<KvStoreStats> KvStore::Stats() {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  return StatsLocked();
}

absl::StatusOr<Snapshot> KvStore::Inspect() {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  Snapshot snap;
  std::memcpy(&snap.header, header_, sizeof(SegmentHeader));
  snap.geometry = geometry_;
  snap.stats = StatsLocked();
  for (uint32_t o = 0; o < geometry_.max_owners; ++o) {
    const OwnerRecord& r = owners_[o];
    if (!r.in_use) continue;
    OwnerInfo info;
    info.slot = o;
    info.pid = r.pid;
    info.generation = r.generation;
    info.attach_unix_ns = r.attach_unix_ns;
    info.heartbeat_unix_ns = r.heartbeat_unix_ns;
    info.label.assign(r.label, strnlen(r.label, sizeof(r.label)));
    info.alive = OwnerAlive(o);
    info.is_self = static_cast<int>(o) == owner_slot_;
    snap.owners.push_back(std::move(info));
  }
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
    const SequenceRecord& r = seqs_[s];
    if (!r.in_use) continue;
    SequenceInfo info;
    info.id = r.sequence_id;
    info.owner_slot = r.owner_slot;
    info.token_count = r.token_count;
    auto blocks = WalkBlocks(s);
    if (blocks.ok()) info.blocks = std::move(*blocks);
    snap.sequences.push_back(std::move(info));
  }
  return snap;
}

absl::Status KvStore::CheckConsistency() {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  const uint64_t n = geometry_.block_count;
  std::vector<uint64_t> per_slot(geometry_.max_sequences, 0);
  uint64_t free_by_meta = 0;
  for (uint64_t b = 0; b < n; ++b) {
    const uint32_t slot = meta_[b].sequence_slot;
    if (slot == kNone) {
      ++free_by_meta;
    } else if (slot >= geometry_.max_sequences || !seqs_[slot].in_use) {
      return absl::DataLossError(
          absl::StrCat("kvstore: block ", b, " belongs to dead slot ", slot));
    } else {
      ++per_slot[slot];
    }
  }
  if (free_by_meta != state_->free_count) {
    return absl::DataLossError(absl::StrCat("kvstore: ", free_by_meta,
                                            " blocks are free but the "
                                            "free count says ",
                                            state_->free_count));
  }
  uint64_t walked = 0;
  for (uint32_t b = state_->free_head; b != kNone; b = meta_[b].next) {
    if (b >= n || meta_[b].sequence_slot != kNone || ++walked > free_by_meta) {
      return absl::DataLossError(absl::StrCat("kvstore: free list is broken at block ", b));
    }
  }
  if (walked != free_by_meta) {
    return absl::DataLossError(
        absl::StrCat("kvstore: free list holds ", walked, " of ", free_by_meta, " free blocks"));
  }
  std::unordered_set<uint64_t> ids;
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
    if (!seqs_[s].in_use) continue;
    if (!ids.insert(seqs_[s].sequence_id).second) {
      return absl::DataLossError(
          absl::StrCat("kvstore: sequence id ", seqs_[s].sequence_id, " appears twice"));
    }
    ASSIGN_OR_RETURN(std::vector<uint32_t> blocks, WalkBlocks(s));
    if (blocks.size() != per_slot[s]) {
      return absl::DataLossError(absl::StrCat("kvstore: sequence ", seqs_[s].sequence_id, " lists ",
                                              blocks.size(), " blocks but owns ", per_slot[s]));
    }
  }
  return absl::OkStatus();
}

}  // namespace specontext::kvstore
