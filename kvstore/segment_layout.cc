#include "kvstore/segment_layout.h"

#include <cstring>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvstore/crc32c.h"

namespace specontext::kvstore {
namespace {

static_assert(std::is_standard_layout_v<SegmentHeader> &&
              std::is_trivially_copyable_v<SegmentHeader>);
static_assert(std::is_standard_layout_v<OwnerRecord> && std::is_standard_layout_v<SequenceRecord>);
static_assert(sizeof(BlockMeta) == 8);

constexpr uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

absl::StatusOr<Layout> ComputeLayout(const Geometry& g) {
  if (g.block_count == 0 || g.block_count > kMaxBlockCount) {
    return absl::InvalidArgumentError(absl::StrCat("kvstore: block count must be in [1, ",
                                                   kMaxBlockCount, "], got ", g.block_count));
  }
  if (g.block_bytes < 64 || g.block_bytes > kMaxBlockBytes || g.block_bytes % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kvstore: block size must be a multiple of 64 bytes in [64, ", kMaxBlockBytes,
                     "], got ", g.block_bytes));
  }
  if (g.block_count * g.block_bytes > kMaxDataBytes) {
    return absl::InvalidArgumentError(absl::StrCat("kvstore: ", g.block_count, " blocks of ",
                                                   g.block_bytes,
                                                   " bytes exceed the 64 TiB limit"));
  }
  if (g.max_sequences == 0 || g.max_sequences > kMaxSequences) {
    return absl::InvalidArgumentError(absl::StrCat("kvstore: max sequences must be in [1, ",
                                                   kMaxSequences, "], got ", g.max_sequences));
  }
  if (g.max_owners == 0 || g.max_owners > kMaxOwners) {
    return absl::InvalidArgumentError(
        absl::StrCat("kvstore: max owners must be in [1, ", kMaxOwners, "], got ", g.max_owners));
  }
  Layout l;
  l.state_offset = AlignUp(sizeof(SegmentHeader), 64);
  l.owners_offset = AlignUp(l.state_offset + sizeof(SharedState), 64);
  l.sequences_offset = AlignUp(l.owners_offset + uint64_t{g.max_owners} * sizeof(OwnerRecord), 64);
  l.blocks_offset =
      AlignUp(l.sequences_offset + uint64_t{g.max_sequences} * sizeof(SequenceRecord), 64);
  const uint64_t align = g.huge_pages ? kHugePageBytes : kPageBytes;
  l.data_offset = AlignUp(l.blocks_offset + g.block_count * sizeof(BlockMeta), align);
  l.segment_bytes = AlignUp(l.data_offset + g.block_count * g.block_bytes, align);
  return l;
}

uint32_t HeaderChecksum(const SegmentHeader& h) {
  return Crc32c(&h, offsetof(SegmentHeader, checksum));
}

SegmentHeader MakeHeader(const Geometry& g, const Layout& layout, int64_t created_unix_ns) {
  SegmentHeader h;
  std::memset(&h, 0, sizeof(h));  // padding bytes are checksummed too: make them deterministic
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.layout_version = kLayoutVersion;
  h.header_bytes = sizeof(SegmentHeader);
  h.segment_bytes = layout.segment_bytes;
  h.block_bytes = g.block_bytes;
  h.block_count = g.block_count;
  h.max_sequences = g.max_sequences;
  h.max_owners = g.max_owners;
  h.flags = g.huge_pages ? kFlagHugePages : 0;
  h.mutex_bytes = sizeof(pthread_mutex_t);
  h.state_offset = layout.state_offset;
  h.owners_offset = layout.owners_offset;
  h.sequences_offset = layout.sequences_offset;
  h.blocks_offset = layout.blocks_offset;
  h.data_offset = layout.data_offset;
  h.created_unix_ns = created_unix_ns;
  h.checksum = HeaderChecksum(h);
  return h;
}

absl::Status ValidateHeader(const SegmentHeader& h, uint64_t file_bytes, Geometry* geometry) {
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError("kvstore: not a SpeContext kvstore segment (bad magic)");
  }
  if (h.layout_version != kLayoutVersion) {
    return absl::FailedPreconditionError(absl::StrCat("kvstore: segment layout version ",
                                                      h.layout_version,
                                                      " is not supported (this "
                                                      "build reads version ",
                                                      kLayoutVersion, ")"));
  }
  if (h.header_bytes != sizeof(SegmentHeader)) {
    return absl::FailedPreconditionError(absl::StrCat("kvstore: header size ", h.header_bytes,
                                                      " differs from ", sizeof(SegmentHeader)));
  }
  const uint32_t crc = HeaderChecksum(h);
  if (crc != h.checksum) {
    return absl::DataLossError(absl::StrFormat(
        "kvstore: header checksum mismatch (stored %08x, computed %08x): segment is corrupt",
        h.checksum, crc));
  }
  if (h.mutex_bytes != sizeof(pthread_mutex_t)) {
    return absl::FailedPreconditionError(
        absl::StrCat("kvstore: segment was created with a ", h.mutex_bytes,
                     "-byte pthread mutex, this process uses ", sizeof(pthread_mutex_t)));
  }
  Geometry g;
  g.block_count = h.block_count;
  g.block_bytes = h.block_bytes;
  g.max_sequences = h.max_sequences;
  g.max_owners = h.max_owners;
  g.huge_pages = (h.flags & kFlagHugePages) != 0;
  auto layout = ComputeLayout(g);
  if (!layout.ok()) {
    return absl::DataLossError(
        absl::StrCat("kvstore: header geometry is invalid: ", layout.status().message()));
  }
  if (layout->segment_bytes != h.segment_bytes || layout->state_offset != h.state_offset ||
      layout->owners_offset != h.owners_offset || layout->sequences_offset != h.sequences_offset ||
      layout->blocks_offset != h.blocks_offset || layout->data_offset != h.data_offset) {
    return absl::DataLossError("kvstore: header offsets do not match its geometry");
  }
  if (file_bytes != h.segment_bytes) {
    return absl::DataLossError(absl::StrCat("kvstore: segment is ", file_bytes,
                                            " bytes but its header says ", h.segment_bytes));
  }
  *geometry = g;
  return absl::OkStatus();
}

}  // namespace specontext::kvstore
