// The on-segment layout of a kvstore: every struct here lives in a POSIX shared-memory segment and
// is read by other processes, so all of them are standard-layout, fixed-size and versioned by
// kLayoutVersion (bump it on any change to a struct or to ComputeLayout).
//
//   offset 0             SegmentHeader   immutable after creation, CRC32C-checksummed
//   state_offset         SharedState     robust mutex, free list, counters (mutable, under the
//   mutex) owners_offset        OwnerRecord     [max_owners] sequences_offset     SequenceRecord
//   [max_sequences] blocks_offset        BlockMeta       [block_count]  (owner sequence slot + next
//   link per block) data_offset          block data      [block_count, block_bytes]  page (or 2
//   MiB) aligned
#pragma once

#include <pthread.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace specontext::kvstore {

inline constexpr char kMagic[8] = {'S', 'P', 'C', 'K', 'V', 'S', 'T', 'R'};
inline constexpr uint32_t kLayoutVersion = 1;
inline constexpr uint32_t kNone = 0xFFFFFFFFu;  // "no block" / "no sequence" in links and slots
inline constexpr uint32_t kFlagHugePages = 1u;
inline constexpr uint64_t kPageBytes = 4096;
inline constexpr uint64_t kHugePageBytes = 2ull << 20;

// Limits that keep every offset computation far from overflow and a corrupt header from asking
// for absurd mappings.
inline constexpr uint64_t kMaxBlockCount = 1ull << 30;
inline constexpr uint64_t kMaxBlockBytes = 1ull << 30;
inline constexpr uint64_t kMaxDataBytes = 1ull << 46;
inline constexpr uint32_t kMaxSequences = 1u << 20;
inline constexpr uint32_t kMaxOwners = 4096;

/// What a segment is made of; two segments with the same geometry are interchangeable.
struct Geometry {
  uint64_t block_count = 0;
  uint64_t block_bytes = 0;  // multiple of 64
  uint32_t max_sequences = 1024;
  uint32_t max_owners = 64;
  bool huge_pages = false;  // data area aligned to 2 MiB and mapped with MAP_HUGETLB if possible

  bool SameShape(const Geometry& o) const {
    return block_count == o.block_count && block_bytes == o.block_bytes &&
           max_sequences == o.max_sequences && max_owners == o.max_owners;
  }
};

struct SegmentHeader {
  char magic[8];  // written last at creation (release), so a half-built segment is
                  // recognisable as "not initialised"
  uint32_t layout_version;
  uint32_t header_bytes;   // sizeof(SegmentHeader)
  uint64_t segment_bytes;  // the whole mapping
  uint64_t block_bytes;
  uint64_t block_count;
  uint32_t max_sequences;
  uint32_t max_owners;
  uint32_t flags;        // kFlagHugePages
  uint32_t mutex_bytes;  // sizeof(pthread_mutex_t) of the creator: an ABI guard
  uint64_t state_offset;
  uint64_t owners_offset;
  uint64_t sequences_offset;
  uint64_t blocks_offset;
  uint64_t data_offset;
  int64_t created_unix_ns;
  uint32_t checksum;  // CRC32C of every byte before this field
  uint32_t reserved;
};

/// Mutable shared state; every field except the mutex is only touched with the mutex held.
struct SharedState {
  pthread_mutex_t mutex;     // robust, process-shared, error-checking
  uint64_t next_generation;  // hands out owner generations (never reused)
  uint64_t free_count;
  uint32_t free_head;       // singly linked through BlockMeta::next
  uint32_t op_in_progress;  // OpCode of the mutation underway: lets a recovering process repair it
  uint32_t op_sequence_slot;
  uint32_t reserved;
  uint64_t reclaimed_blocks;  // cumulative: blocks taken back from dead owners
  uint64_t reclaimed_sequences;
  uint64_t reclaimed_owners;
  uint64_t repaired_sequences;  // sequences dropped because their owner died mid-mutation
  uint64_t lock_recoveries;     // times the mutex was found EOWNERDEAD
};

enum OpCode : uint32_t { kOpNone = 0, kOpAllocate = 1, kOpFree = 2, kOpReclaim = 3, kOpDetach = 4 };

struct OwnerRecord {
  uint32_t in_use;
  int32_t pid;
  uint64_t start_ticks;  // /proc/<pid>/stat starttime: tells a reused pid from the original
  uint64_t generation;
  int64_t attach_unix_ns;
  int64_t heartbeat_unix_ns;  // written with relaxed atomics, outside the mutex
  char label[32];
};

struct SequenceRecord {
  uint32_t in_use;
  uint32_t owner_slot;
  uint64_t owner_generation;  // a sequence belongs to (slot, generation), not to the slot alone
  uint64_t sequence_id;
  uint64_t token_count;
  uint32_t block_count;
  uint32_t head;  // first block, kNone when empty
  uint32_t tail;
  uint32_t reserved;
};

struct BlockMeta {
  uint32_t sequence_slot;  // kNone when free: the source of truth for ownership
  uint32_t next;           // next block of the same sequence, or of the free list
};

/// Offsets and sizes derived from a geometry (never read from the segment itself).
struct Layout {
  uint64_t state_offset = 0;
  uint64_t owners_offset = 0;
  uint64_t sequences_offset = 0;
  uint64_t blocks_offset = 0;
  uint64_t data_offset = 0;
  uint64_t segment_bytes = 0;
};

/// Checks the geometry's limits and computes where everything goes.
absl::StatusOr<Layout> ComputeLayout(const Geometry& g);

/// Fills a header for a new segment (magic included) with its checksum.
SegmentHeader MakeHeader(const Geometry& g, const Layout& layout, int64_t created_unix_ns);

/// CRC32C over the checksummed prefix of `h`.
uint32_t HeaderChecksum(const SegmentHeader& h);

/// Validates a header read from a segment of `file_bytes` bytes: magic, version, sizes, checksum,
/// and that the stored offsets are exactly what the stored geometry implies. Never trusts a field
/// before checking it. On success fills `geometry`.
absl::Status ValidateHeader(const SegmentHeader& h, uint64_t file_bytes, Geometry* geometry);

}  // namespace specontext::kvstore
