// Sequence operations: allocate (plan, then apply), free, token counts, block addresses.
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/status_macros.h"
#include "kvstore/kv_store.h"
#include "kvstore/kv_store_lock.h"

namespace specontext::kvstore {

absl::Status KvStore::CheckSelf() const {
  if (owner_slot_ < 0) {
    return absl::FailedPreconditionError(
        "kvstore: an observer handle cannot own or change sequences");
  }
  if (::getpid() != pid_) {
    return absl::FailedPreconditionError(
        "kvstore: handle used in a forked child: attach a new one");
  }
  const OwnerRecord& r = owners_[owner_slot_];
  if (!r.in_use || r.generation != generation_) {
    return absl::FailedPreconditionError(
        "kvstore: this handle's owner slot was reclaimed by another process");
  }
  return absl::OkStatus();
}

uint32_t KvStore::FindSequence(uint64_t id) const {
  for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
    if (seqs_[s].in_use && seqs_[s].sequence_id == id) return s;
  }
  return kNone;
}

absl::StatusOr<uint32_t> KvStore::FindOwnSequence(uint64_t id) const {
  RETURN_IF_ERROR(CheckSelf());
  const uint32_t s = FindSequence(id);
  if (s == kNone) return absl::NotFoundError(absl::StrCat("kvstore: no sequence ", id));
  const SequenceRecord& r = seqs_[s];
  if (r.owner_slot != static_cast<uint32_t>(owner_slot_) || r.owner_generation != generation_) {
    return absl::PermissionDeniedError(
        absl::StrCat("kvstore: sequence ", id, " belongs to owner slot ", r.owner_slot));
  }
  return s;
}

absl::StatusOr<std::vector<uint32_t>> KvStore::WalkBlocks(uint32_t slot) const {
  const SequenceRecord& r = seqs_[slot];
  std::vector<uint32_t> out;
  out.reserve(r.block_count);
  uint32_t b = r.head;
  for (uint32_t i = 0; i < r.block_count; ++i) {
    if (b >= geometry_.block_count || meta_[b].sequence_slot != slot) {
      return absl::DataLossError(absl::StrCat("kvstore: block list of sequence ", r.sequence_id,
                                              " is broken at position ", i));
    }
    out.push_back(b);
    b = meta_[b].next;
  }
  if (b != kNone || (out.empty() ? r.tail != kNone : r.tail != out.back())) {
    return absl::DataLossError(
        absl::StrCat("kvstore: block list of sequence ", r.sequence_id, " has a bad end"));
  }
  return out;
}

absl::StatusOr<KvStore::AllocPlan> KvStore::PlanAllocate(uint64_t id, uint32_t n) {
  RETURN_IF_ERROR(CheckSelf());
  AllocPlan plan;
  plan.slot = FindSequence(id);
  if (plan.slot != kNone) {
    ASSIGN_OR_RETURN(plan.slot, FindOwnSequence(id));
    if (uint64_t{seqs_[plan.slot].block_count} + n >= kNone) {
      return absl::ResourceExhaustedError(absl::StrCat("kvstore: sequence ", id, " is too long"));
    }
  } else {
    plan.new_sequence = true;
    for (uint32_t s = 0; s < geometry_.max_sequences && plan.slot == kNone; ++s) {
      if (!seqs_[s].in_use) plan.slot = s;
    }
    if (plan.slot == kNone) {
      return absl::ResourceExhaustedError(absl::StrCat("kvstore: all ", geometry_.max_sequences,
                                                       " sequence slots of ", name_, " are taken"));
    }
  }
  if (n > state_->free_count) {
    return absl::ResourceExhaustedError(absl::StrCat("kvstore: sequence ", id, " needs ", n,
                                                     " blocks, ", state_->free_count, " free"));
  }
  // Walk the free list for exactly the blocks to take; a list that disagrees with the block
  // metadata (a scribbled segment) is rebuilt once rather than trusted.
  for (int attempt = 0; attempt < 2; ++attempt) {
    plan.blocks.clear();
    uint32_t b = state_->free_head;
    while (plan.blocks.size() < n && b < geometry_.block_count && meta_[b].sequence_slot == kNone) {
      plan.blocks.push_back(b);
      b = meta_[b].next;
    }
    if (plan.blocks.size() == n) return plan;
    RebuildFreeList();
    if (n > state_->free_count) break;
  }
  return absl::DataLossError(absl::StrCat("kvstore: free list of ", name_, " is inconsistent"));
}

SequenceRecord& KvStore::BeginAllocate(const AllocPlan& plan, uint64_t id) {
  state_->op_sequence_slot = plan.slot;
  state_->op_in_progress = kOpAllocate;
  SequenceRecord& s = seqs_[plan.slot];
  if (plan.new_sequence) {
    s.owner_slot = static_cast<uint32_t>(owner_slot_);
    s.owner_generation = generation_;
    s.sequence_id = id;
    s.token_count = 0;
    s.block_count = 0;
    s.head = kNone;
    s.tail = kNone;
    s.in_use = 1;
  }
  return s;
}

void KvStore::AppendBlock(SequenceRecord& s, uint32_t slot, uint32_t b, uint32_t step) {
  meta_[b].sequence_slot = slot;
  meta_[b].next = kNone;
  if (apply_hook_) apply_hook_(step);
  if (s.tail == kNone) {
    s.head = b;
  } else {
    meta_[s.tail].next = b;
  }
  s.tail = b;
  ++s.block_count;
}

void KvStore::ApplyAllocate(const AllocPlan& plan, uint64_t id, uint32_t n) {
  SequenceRecord& s = BeginAllocate(plan, id);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t b = plan.blocks[i];
    state_->free_head = meta_[b].next;
    --state_->free_count;
    // Off the free list but not yet linked (the hook's moment): the worst moment to die.
    AppendBlock(s, plan.slot, b, i + 1);
  }
  state_->op_in_progress = kOpNone;
}

absl::Status KvStore::Allocate(uint64_t id, uint32_t n) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  ASSIGN_OR_RETURN(AllocPlan plan, PlanAllocate(id, n));
  ApplyAllocate(plan, id, n);
  return absl::OkStatus();
}

void KvStore::PushFree(uint32_t block) {
  meta_[block].sequence_slot = kNone;
  meta_[block].next = state_->free_head;
  state_->free_head = block;
  ++state_->free_count;
}

absl::Status KvStore::FreeTail(uint64_t id, uint32_t n) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  ASSIGN_OR_RETURN(uint32_t slot, FindOwnSequence(id));
  SequenceRecord& s = seqs_[slot];
  if (n > s.block_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kvstore: cannot free ", n, " blocks of sequence ", id, " which has ", s.block_count));
  }
  ASSIGN_OR_RETURN(std::vector<uint32_t> blocks, WalkBlocks(slot));
  const uint32_t keep = s.block_count - n;
  state_->op_sequence_slot = slot;
  state_->op_in_progress = kOpFree;
  s.block_count = keep;
  s.tail = keep == 0 ? kNone : blocks[keep - 1];
  if (keep == 0) {
    s.head = kNone;
  } else {
    meta_[s.tail].next = kNone;
  }
  // Pushed in reverse so the free list hands the same blocks back first (cache-friendlier reuse).
  for (size_t i = blocks.size(); i > keep; --i) PushFree(blocks[i - 1]);
  state_->op_in_progress = kOpNone;
  return absl::OkStatus();
}

absl::Status KvStore::FreeSequence(uint64_t id) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  ASSIGN_OR_RETURN(uint32_t slot, FindOwnSequence(id));
  state_->op_sequence_slot = slot;
  state_->op_in_progress = kOpFree;
  auto blocks = WalkBlocks(slot);
  if (blocks.ok()) {
    for (size_t i = blocks->size(); i > 0; --i) PushFree((*blocks)[i - 1]);
    seqs_[slot].in_use = 0;
  } else {
    std::vector<char> drop(geometry_.max_sequences, 0);
    drop[slot] = 1;
    DropSequences(drop);  // broken links: free by scanning instead
  }
  state_->op_in_progress = kOpNone;
  return absl::OkStatus();
}

absl::Status KvStore::SetTokenCount(uint64_t id, uint64_t tokens) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  ASSIGN_OR_RETURN(uint32_t slot, FindOwnSequence(id));
  seqs_[slot].token_count = tokens;
  return absl::OkStatus();
}

absl::StatusOr<SequenceInfo> KvStore::GetSequence(uint64_t id) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  const uint32_t slot = FindSequence(id);
  if (slot == kNone) return absl::NotFoundError(absl::StrCat("kvstore: no sequence ", id));
  SequenceInfo info;
  info.id = id;
  info.owner_slot = seqs_[slot].owner_slot;
  info.token_count = seqs_[slot].token_count;
  ASSIGN_OR_RETURN(info.blocks, WalkBlocks(slot));
  return info;
}

absl::StatusOr<uint8_t*> KvStore::BlockData(uint32_t block) const {
  if (data_ == nullptr) return absl::FailedPreconditionError("kvstore: handle is closed");
  if (block >= geometry_.block_count) {
    return absl::OutOfRangeError(
        absl::StrCat("kvstore: block ", block, " out of range [0, ", geometry_.block_count, ")"));
  }
  return data_ + uint64_t{block} * geometry_.block_bytes;
}

absl::Status KvStore::Heartbeat() {
  if (state_ == nullptr) return absl::FailedPreconditionError("kvstore: handle is closed");
  RETURN_IF_ERROR(CheckSelf());
  std::atomic_ref<int64_t>(owners_[owner_slot_].heartbeat_unix_ns)
      .store(absl::ToUnixNanos(absl::Now()), std::memory_order_relaxed);
  return absl::OkStatus();
}

}  // namespace specontext::kvstore
