// Contiguous runs of blocks: one tensor that must be contiguous in host memory (a layer of a
// sequence's host KV tier, viewed by the engine as [n_kv_heads, capacity, head_dim]) occupies
// consecutive blocks.
//
// Block metadata is the source of truth for ownership (BlockMeta::sequence_slot), so both
// operations mark blocks first and relink lists afterwards, under op_in_progress: a process that
// dies in the middle leaves a state RepairAfterOwnerDeath fixes (the sequence is dropped, the free
// list rebuilt from metadata).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "kvstore/kv_store.h"
#include "kvstore/kv_store_lock.h"

namespace specontext::kvstore {

absl::StatusOr<uint32_t> KvStore::AllocateRun(uint64_t id, uint32_t n) {
  if (n == 0) return absl::InvalidArgumentError("kvstore: a run needs at least one block");
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  // The sequence slot (existing and ours, or a free one); n = 0 takes no block from the free list.
  ASSIGN_OR_RETURN(AllocPlan plan, PlanAllocate(id, 0));
  if (!plan.new_sequence && uint64_t{seqs_[plan.slot].block_count} + n >= kNone) {
    return absl::ResourceExhaustedError(absl::StrCat("kvstore: sequence ", id, " is too long"));
  }
  if (n > state_->free_count) {
    return absl::ResourceExhaustedError(absl::StrCat("kvstore: sequence ", id, " needs a run of ",
                                                     n, " blocks, ", state_->free_count, " free"));
  }
  // First fit: the lowest run keeps the high end of the segment free for large runs.
  uint64_t first = 0, len = 0;
  for (uint64_t b = 0; b < geometry_.block_count && len < n; ++b) {
    if (meta_[b].sequence_slot == kNone) {
      if (len++ == 0) first = b;
    } else {
      len = 0;
    }
  }
  if (len < n) {
    return absl::ResourceExhaustedError(absl::StrCat("kvstore: no run of ", n,
                                                     " contiguous free blocks in ", name_, " (",
                                                     state_->free_count, " free but fragmented)"));
  }
  SequenceRecord& s = BeginAllocate(plan, id);
  for (uint64_t i = 0; i < n; ++i) {
    AppendBlock(s, plan.slot, static_cast<uint32_t>(first + i), static_cast<uint32_t>(i + 1));
  }
  // The run came from the middle of the free list: relink it from the metadata.
  RebuildFreeList();
  state_->op_in_progress = kOpNone;
  return static_cast<uint32_t>(first);
}

absl::Status KvStore::FreeRun(uint64_t id, uint32_t first, uint32_t n) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  ASSIGN_OR_RETURN(uint32_t slot, FindOwnSequence(id));
  if (n == 0 || uint64_t{first} + n > geometry_.block_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kvstore: run [", first, ", ", uint64_t{first} + n, ") is empty or outside the segment"));
  }
  for (uint64_t b = first; b < uint64_t{first} + n; ++b) {
    if (meta_[b].sequence_slot != slot) {
      return absl::InvalidArgumentError(
          absl::StrCat("kvstore: block ", b, " is not a block of sequence ", id));
    }
  }
  ASSIGN_OR_RETURN(std::vector<uint32_t> blocks, WalkBlocks(slot));
  std::vector<uint32_t> keep;
  keep.reserve(blocks.size());
  for (uint32_t b : blocks) {
    if (b < first || b >= first + n) keep.push_back(b);
  }
  state_->op_sequence_slot = slot;
  state_->op_in_progress = kOpFree;
  SequenceRecord& s = seqs_[slot];
  for (size_t i = 0; i < keep.size(); ++i)
    meta_[keep[i]].next = i + 1 < keep.size() ? keep[i + 1] : kNone;
  s.head = keep.empty() ? kNone : keep.front();
  s.tail = keep.empty() ? kNone : keep.back();
  s.block_count = static_cast<uint32_t>(keep.size());
  for (uint64_t b = uint64_t{first} + n; b > first; --b) PushFree(static_cast<uint32_t>(b - 1));
  state_->op_in_progress = kOpNone;
  return absl::OkStatus();
}

}  // namespace specontext::kvstore
