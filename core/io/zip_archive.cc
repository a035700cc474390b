// ZIP central directory parsing (zip_archive.h). Every read goes through Reader, which checks
// bounds.
#include "core/io/zip_archive.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint16_t kZip64ExtraId = 0x0001;
constexpr size_t kEndRecordBytes = 22;
constexpr size_t kZip64LocatorBytes = 20;
constexpr size_t kZip64EndBytes = 56;
constexpr size_t kCentralBytes = 46;
constexpr size_t kLocalBytes = 30;

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("zip: ", msg));
}

// Little-endian fields at bounds-checked offsets.
struct Reader {
  const uint8_t* data;
  size_t size;
  bool Has(uint64_t off, uint64_t n) const { return off <= size && n <= size - off; }
  uint64_t Le(uint64_t off, int bytes) const {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | data[off + i];
    return v;
  }
  uint16_t U16(uint64_t off) const { return static_cast<uint16_t>(Le(off, 2)); }
  uint32_t U32(uint64_t off) const { return static_cast<uint32_t>(Le(off, 4)); }
  uint64_t U64(uint64_t off) const { return Le(off, 8); }
};

// The end-of-central-directory record: the last signature within the final 64 KiB + 22 bytes (a
// comment of up to 65535 bytes may follow it).
absl::StatusOr<uint64_t> FindEndRecord(const Reader& r) {
  if (r.size < kEndRecordBytes)
    return Bad(absl::StrCat("file is ", r.size, " bytes, too short for an archive"));
  const uint64_t lowest = r.size > kEndRecordBytes + 0xffff ? r.size - kEndRecordBytes - 0xffff : 0;
  for (uint64_t p = r.size - kEndRecordBytes + 1; p-- > lowest;) {
    if (r.U32(p) == kEndSig && p + kEndRecordBytes + r.U16(p + 20) <= r.size) return p;
  }
  return Bad("no end-of-central-directory record (not a ZIP archive, or truncated)");
}

struct CentralDirectory {
  uint64_t entries = 0, offset = 0, size = 0;
};

absl::StatusOr<CentralDirectory> ReadEndRecords(const Reader& r, uint64_t end) {
  if (r.U16(end + 4) != 0 || r.U16(end + 6) != 0)
    return Bad("multi-disk archives are not supported");
  CentralDirectory cd{r.U16(end + 10), r.U32(end + 16), r.U32(end + 12)};
  if (cd.entries != 0xffff && cd.offset != 0xffffffffu && cd.size != 0xffffffffu) return cd;
  // ZIP64: a locator right before the end record points at the ZIP64 end record with 64-bit fields.
  if (end < kZip64LocatorBytes || r.U32(end - kZip64LocatorBytes) != kZip64LocatorSig) {
    return Bad("the end record asks for ZIP64 fields but there is no ZIP64 locator");
  }
  const uint64_t rec = r.U64(end - kZip64LocatorBytes + 8);
  if (!r.Has(rec, kZip64EndBytes) || r.U32(rec) != kZip64EndSig) {
    return Bad(absl::StrCat("the ZIP64 end record at ", rec, " is missing or outside the file"));
  }
  cd.entries = r.U64(rec + 32);
  cd.size = r.U64(rec + 40);
  cd.offset = r.U64(rec + 48);
  return cd;
}

// The ZIP64 extended-information extra field of a central record: each 64-bit value is present only
// when its 32-bit field holds 0xffffffff, in the order uncompressed size, compressed size, local
// offset.
absl::Status ApplyZip64Extra(const Reader& r, uint64_t extra, uint64_t extra_len, bool need_usize,
                             bool need_csize, bool need_offset, uint64_t* usize, uint64_t* csize,
                             uint64_t* offset) {
  uint64_t p = extra;
  const uint64_t end = extra + extra_len;
  while (p + 4 <= end) {
    const uint16_t id = r.U16(p), len = r.U16(p + 2);
    if (p + 4 + len > end) return Bad("an extra field runs past its record");
    if (id == kZip64ExtraId) {
      uint64_t q = p + 4;
      const uint64_t q_end = q + len;
      for (auto [need, field] :
           {std::pair{need_usize, usize}, {need_csize, csize}, {need_offset, offset}}) {
        if (!need) continue;
        if (q + 8 > q_end) return Bad("the ZIP64 extra field is shorter than its record needs");
        *field = r.U64(q);
        q += 8;
      }
      return absl::OkStatus();
    }
    p += 4 + len;
  }
  if (need_usize || need_csize || need_offset)
    return Bad("a record needs ZIP64 sizes but has no ZIP64 extra field");
  return absl::OkStatus();
}

}  // namespace

const ZipEntry* ZipDirectory::Find(std::string_view name) const {
  for (const ZipEntry& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

bool LooksLikeZip(const uint8_t* data, size_t size) {
  return size >= 4 && Reader{data, size}.U32(0) == kLocalHeaderSig;
}

absl::StatusOr<ZipDirectory> ParseZipDirectory(const uint8_t* data, size_t size) {
  const Reader r{data, size};
  ASSIGN_OR_RETURN(uint64_t end, FindEndRecord(r));
  ASSIGN_OR_RETURN(CentralDirectory cd, ReadEndRecords(r, end));
  if (cd.entries > kMaxZipEntries)
    return Bad(absl::StrCat(cd.entries, " entries is implausibly many"));
  if (!r.Has(cd.offset, cd.size)) {
    return Bad(absl::StrCat("the central directory [", cd.offset, ", +", cd.size,
                            ") is outside the file (", size, " bytes)"));
  }
  ZipDirectory dir;
  dir.entries.reserve(
      static_cast<size_t>(std::min<uint64_t>(cd.entries, cd.size / kCentralBytes + 1)));
  uint64_t p = cd.offset;
  const uint64_t cd_end = cd.offset + cd.size;
  for (uint64_t i = 0; i < cd.entries; ++i) {
    if (p + kCentralBytes > cd_end || r.U32(p) != kCentralSig) {
      return Bad(absl::StrCat("central directory record ", i, " of ", cd.entries,
                              " is missing or corrupt"));
    }
    const uint16_t flags = r.U16(p + 8), method = r.U16(p + 10);
    uint64_t csize = r.U32(p + 20), usize = r.U32(p + 24);
    const uint16_t name_len = r.U16(p + 28), extra_len = r.U16(p + 30), comment_len = r.U16(p + 32);
    uint64_t local = r.U32(p + 42);
    if (p + kCentralBytes + name_len + extra_len + comment_len > cd_end) {
      return Bad(absl::StrCat("central directory record ", i, " runs past the directory"));
    }
    ZipEntry e;
    e.name.assign(reinterpret_cast<const char*>(data + p + kCentralBytes), name_len);
    const std::string where = absl::StrCat("entry \"", e.name, "\": ");
    RETURN_IF_ERROR(ApplyZip64Extra(r, p + kCentralBytes + name_len, extra_len,
                                    usize == 0xffffffffu, csize == 0xffffffffu,
                                    local == 0xffffffffu, &usize, &csize, &local));
    if (flags & 1u) return Bad(where + "is encrypted");
    if (method != 0) {
      return Bad(
          absl::StrCat(where, "is compressed (method ", method,
                       "); torch.save stores entries uncompressed, so this archive was repacked. "
                       "Re-save it with torch.save or convert it to safetensors"));
    }
    if (csize != usize)
      return Bad(
          absl::StrCat(where, "is stored but its sizes differ (", csize, " vs ", usize, ")"));
    if (!r.Has(local, kLocalBytes) || r.U32(local) != kLocalHeaderSig) {
      return Bad(
          absl::StrCat(where, "its local header at ", local, " is missing or outside the file"));
    }
    // The data follows the local header's own name and extra field (the extra field differs from
    // the central one: torch pads it so that records start 64-byte aligned).
    e.data_offset = local + kLocalBytes + r.U16(local + 26) + r.U16(local + 28);
    e.size = usize;
    if (!r.Has(e.data_offset, e.size)) {
      return Bad(absl::StrCat(where, "its ", e.size, " bytes at ", e.data_offset,
                              " run past the end of the file (", size, " bytes)"));
    }
    dir.entries.push_back(std::move(e));
    p += kCentralBytes + name_len + extra_len + comment_len;
  }
  return dir;
}

}  // namespace specontext
