// KvStore: KV blocks in a named POSIX shared-memory segment that outlives the generator process.
//
// A segment holds `block_count` fixed-size blocks of host memory, a per-sequence table (sequence id
// -> ordered list of blocks, token count, owner) and an owner table. Every process that attaches
// registers an owner slot identified by (pid, process start time, generation); when a process
// attaches it reclaims the blocks and sequences of owners that died (SIGKILL included), so a
// restarted generator gets back every orphaned block. Processes coordinate through a robust
// process-shared mutex stored in the segment: a process killed while holding it cannot wedge the
// others, the next locker repairs the interrupted mutation.
//
// Mutations plan before they apply (llama.cpp's memory interface): Allocate checks that the whole
// request fits and only then changes the segment, so a failed Allocate changes nothing.
//
// Thread-safety: every method may be called from any thread (they take the segment mutex). A
// handle must not be used in a child after fork(): attach a new one there.
// The block data itself is not synchronised: the owner of a sequence writes and reads its blocks.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvstore/segment_layout.h"

namespace specontext::kvstore {

enum class OpenMode {
  kCreate,          // fail (AlreadyExists) if the segment exists
  kAttach,          // fail (NotFound) if it does not
  kCreateOrAttach,  // what a generator does: first one creates, restarts reattach
};

struct KvStoreOptions {
  std::string name;  // "/name" or "name"; no other '/', at most 250 characters
  OpenMode mode = OpenMode::kCreateOrAttach;
  // Required for kCreate/kCreateOrAttach. For kAttach: when set, a segment of another geometry is
  // refused (FailedPrecondition); when unset any valid segment is accepted.
  std::optional<Geometry> geometry;
  // false: attach as an observer (the inspect tool): no owner slot, no reclaim, no allocation.
  bool register_owner = true;
  bool reclaim_on_attach = true;
  std::string owner_label;  // shown by inspect, truncated to 31 bytes
  // How long to wait for a segment that another process is still initialising.
  absl::Duration init_wait = absl::Seconds(2);
  // How long to wait for the segment's lock before failing with DeadlineExceeded: a holder that is
  // stopped (SIGSTOP, a debugger) or hung must not hang every other process.
  absl::Duration lock_timeout = absl::Seconds(10);
  // Test hook: called with the mutex held in the middle of Allocate, once per block (step = 1..n),
  // after the block left the free list and before it is linked into the sequence, i.e. while the
  // segment is inconsistent. Lets tests die in the middle of a mutation.
  std::function<void(uint32_t step)> apply_hook_for_testing;
};

struct SequenceInfo {
  uint64_t id = 0;
  uint32_t owner_slot = 0;
  uint64_t token_count = 0;
  std::vector<uint32_t> blocks;  // in sequence order
};

struct OwnerInfo {
  uint32_t slot = 0;
  pid_t pid = 0;
  uint64_t generation = 0;
  int64_t attach_unix_ns = 0;
  int64_t heartbeat_unix_ns = 0;
  std::string label;
  bool alive = false;
  bool is_self = false;
};

struct KvStoreStats {
  uint64_t total_blocks = 0;
  uint64_t free_blocks = 0;
  uint64_t used_blocks = 0;
  uint64_t sequences = 0;
  uint64_t owners = 0;            // registered owner slots (alive or not yet reclaimed)
  uint64_t reclaimed_blocks = 0;  // cumulative over the segment's life
  uint64_t reclaimed_sequences = 0;
  uint64_t reclaimed_owners = 0;
  uint64_t repaired_sequences = 0;
  uint64_t lock_recoveries = 0;
};

/// What one reclaim pass took back.
struct ReclaimReport {
  uint64_t owners = 0;
  uint64_t sequences = 0;
  uint64_t blocks = 0;
};

/// A consistent picture of the whole segment (taken under the mutex).
struct Snapshot {
  SegmentHeader header;
  Geometry geometry;
  KvStoreStats stats;
  std::vector<OwnerInfo> owners;
  std::vector<SequenceInfo> sequences;
};

class KvStore {
 public:
  /// Creates and/or attaches a segment as `options` says. Errors: InvalidArgument (bad name or
  /// geometry, bad magic), AlreadyExists / NotFound (mode), FailedPrecondition (geometry or version
  /// mismatch, uninitialised segment, owner table full), DataLoss (checksum or size mismatch).
  static absl::StatusOr<std::unique_ptr<KvStore>> Open(const KvStoreOptions& options);
  /// Unlinks the named segment (mappings that exist stay valid until unmapped).
  static absl::Status Remove(const std::string& name);
  /// "name" -> "/name", validated.
  static absl::StatusOr<std::string> NormalizeName(const std::string& name);

  KvStore(const KvStore&) = delete;
  KvStore& operator=(const KvStore&) = delete;
  /// Close()s, logging (not returning) errors.
  ~KvStore();

  /// Frees this owner's sequences, releases its owner slot and unmaps. Idempotent.
  absl::Status Close();

  /// Appends `n` blocks to sequence `id`, creating the sequence (owned by this handle) if needed.
  /// All or nothing: ResourceExhausted (not enough free blocks or sequence slots) or
  /// PermissionDenied (another owner's sequence) leave the segment unchanged.
  absl::Status Allocate(uint64_t id, uint32_t n);
  /// Frees the last `n` blocks of sequence `id` (the sequence stays, possibly empty).
  absl::Status FreeTail(uint64_t id, uint32_t n);
  /// Frees every block of sequence `id` and removes it.
  absl::Status FreeSequence(uint64_t id);
  /// Appends a run of `n` consecutive blocks (block indices first .. first + n - 1, so one contiguous
  /// range of data_base()) to sequence `id`, creating the sequence if needed; returns `first`. First fit
  /// over the block metadata. All or nothing: ResourceExhausted when no run of `n` free blocks exists
  /// (also when enough blocks are free but fragmented), PermissionDenied for another owner's sequence.
  /// What backs one tensor that must be contiguous (a host KV tier layer, kv_store_runs.cc).
  absl::StatusOr<uint32_t> AllocateRun(uint64_t id, uint32_t n);
  /// Frees blocks [first, first + n) of sequence `id` wherever they sit in its list (the sequence stays,
  /// its other blocks keep their order). InvalidArgument when one of them is not the sequence's.
  absl::Status FreeRun(uint64_t id, uint32_t first, uint32_t n);
  absl::Status SetTokenCount(uint64_t id, uint64_t tokens);
  absl::StatusOr<SequenceInfo> GetSequence(uint64_t id);

  /// Host address of block `block`: block_bytes() bytes, valid while this handle is open.
  absl::StatusOr<uint8_t*> BlockData(uint32_t block) const;
  /// The whole mapping (header included): what a CUDA backend passes to cudaHostRegister.
  void* mapping_base() const { return base_; }
  size_t mapping_bytes() const { return mapping_bytes_; }
  /// The block data area: [block_count, block_bytes] bytes, page aligned.
  uint8_t* data_base() const { return data_; }
  size_t data_bytes() const { return geometry_.block_count * geometry_.block_bytes; }
  uint64_t block_bytes() const { return geometry_.block_bytes; }
  const Geometry& geometry() const { return geometry_; }
  const std::string& name() const { return name_; }
  bool created() const { return created_; }
  /// True when the mapping really uses MAP_HUGETLB (huge pages requested and available).
  bool huge_pages_active() const { return huge_pages_active_; }
  /// This handle's owner slot, or -1 for an observer.
  int owner_slot() const { return owner_slot_; }
  /// What the reclaim pass at attach took back.
  const ReclaimReport& attach_reclaim() const { return attach_reclaim_; }

  /// Records that this owner is alive (lock-free; shown by inspect).
  absl::Status Heartbeat();
  /// Takes back blocks and sequences of dead owners now.
  absl::StatusOr<ReclaimReport> ReclaimDead();
  absl::StatusOr<KvStoreStats> Stats();
  absl::StatusOr<Snapshot> Inspect();
  /// Verifies every invariant (each block free xor in exactly one sequence, list lengths match
  /// counts, free list holds exactly the free blocks); DataLoss naming the first violation.
  absl::Status CheckConsistency();

 private:
  class Lock;
  struct AllocPlan {
    uint32_t slot = kNone;  // the sequence's slot (a free one when new_sequence)
    bool new_sequence = false;
    std::vector<uint32_t> blocks;  // exactly the blocks Apply will take, from the free-list head
  };
  KvStore() = default;

  absl::Status CreateSegment(const KvStoreOptions& o, int fd);
  absl::Status AttachSegment(const KvStoreOptions& o, int fd);
  absl::Status MapSegment(int fd, uint64_t bytes, bool huge);
  absl::Status RegisterOwner(const std::string& label);
  absl::StatusOr<Lock> Acquire();

  // All below: mutex held.
  absl::Status CheckSelf() const;
  uint32_t FindSequence(uint64_t id) const;
  absl::StatusOr<uint32_t> FindOwnSequence(uint64_t id) const;
  absl::StatusOr<AllocPlan> PlanAllocate(uint64_t id, uint32_t n);
  void ApplyAllocate(const AllocPlan& plan, uint64_t id, uint32_t n);
  // Marks an allocation in progress (crash repair) and creates the sequence's record when the plan says so.
  SequenceRecord& BeginAllocate(const AllocPlan& plan, uint64_t id);
  // Gives block b to sequence `s` (record slot `slot`) at the end of its chain; the test hook runs (with
  // `step`) after the block is marked and before it is linked.
  void AppendBlock(SequenceRecord& s, uint32_t slot, uint32_t b, uint32_t step);
  void PushFree(uint32_t block);
  // Removes the sequences whose slot is marked in `drop` ([max_sequences]) and frees their blocks
  // by scanning block metadata (never trusting links), then rebuilds the free list. Returns blocks
  // freed.
  uint64_t DropSequences(const std::vector<char>& drop);
  // Relinks the free list from block metadata: every block whose sequence slot is kNone or not in
  // use becomes free.
  void RebuildFreeList();
  ReclaimReport ReclaimDeadLocked();
  // After EOWNERDEAD: drops the sequence whose mutation was interrupted (its links cannot be
  // trusted), relinks the free list and reclaims dead owners.
  void RepairAfterOwnerDeath();
  bool OwnerAlive(uint32_t slot) const;
  bool SequenceOrphaned(const SequenceRecord& s) const;
  absl::StatusOr<std::vector<uint32_t>> WalkBlocks(uint32_t slot) const;
  KvStoreStats StatsLocked() const;

  std::string name_;
  absl::Duration lock_timeout_ = absl::Seconds(10);
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  size_t mapping_bytes_ = 0;
  bool created_ = false;
  bool huge_pages_active_ = false;
  Geometry geometry_;
  SegmentHeader* header_ = nullptr;
  SharedState* state_ = nullptr;
  OwnerRecord* owners_ = nullptr;
  SequenceRecord* seqs_ = nullptr;
  BlockMeta* meta_ = nullptr;
  uint8_t* data_ = nullptr;
  int owner_slot_ = -1;
  uint64_t generation_ = 0;
  pid_t pid_ = 0;
  ReclaimReport attach_reclaim_;
  std::function<void(uint32_t)> apply_hook_;
};

}  // namespace specontext::kvstore
