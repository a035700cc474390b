// Read-only view of a ZIP archive held in memory (a mapped file): its central directory, and where
// each stored entry's bytes lie. Only what torch.save archives need: entries stored without
// compression (torch.save writes every record uncompressed, 64-byte aligned, through miniz:
// pytorch/pytorch caffe2/serialize/inline_container.cc), ZIP64 sizes and offsets for archives past
// 4 GiB. Compressed or encrypted entries are refused naming the entry; nothing is decompressed.
//
// Layout read (PKWARE APPNOTE.TXT 4.3): [local header 0x04034b50, name, extra, data]... central
// directory [0x02014b50 records] [ZIP64 end record 0x06064b50, locator 0x07064b50] end record
// 0x06054b50.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

/// One entry of the central directory. `data_offset` is where its (stored) bytes start in the
/// archive.
struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;
  uint64_t size = 0;
};

/// Entries of a parsed archive in central-directory order.
struct ZipDirectory {
  std::vector<ZipEntry> entries;
  /// The entry named `name`, or nullptr.
  const ZipEntry* Find(std::string_view name) const;
};

/// Refuses archives with more entries than this (a torch.save archive holds one per storage, plus
/// ~5).
inline constexpr uint64_t kMaxZipEntries = 1u << 20;

/// Parses the central directory of `data[0, size)` and checks every entry: stored (method 0), not
/// encrypted, its local header and bytes inside the buffer. Never reads outside the buffer.
/// InvalidArgument naming the problem (and the entry) otherwise.
absl::StatusOr<ZipDirectory> ParseZipDirectory(const uint8_t* data, size_t size);

/// True when the buffer starts like a ZIP archive (a local file header signature).
bool LooksLikeZip(const uint8_t* data, size_t size);

}  // namespace specontext
