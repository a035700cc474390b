#include "kvstore/kvstore_inspect.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace specontext::kvstore {
namespace {

std::string FormatTime(int64_t unix_ns) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixNanos(unix_ns),
                          absl::UTCTimeZone());
}

double AgeSeconds(int64_t unix_ns) {
  return absl::ToDoubleSeconds(absl::Now() - absl::FromUnixNanos(unix_ns));
}

}  // namespace

std::string FormatSnapshotText(const std::string& name, const Snapshot& s) {
  const SegmentHeader& h = s.header;
  const KvStoreStats& st = s.stats;
  std::string out = absl::StrFormat(
      "segment %s\n  layout version %u, %u-byte header, checksum %08x\n"
      "  %d bytes mapped, %d blocks x %d bytes, data at offset %d%s\n"
      "  max %u sequences, %u owners; created %s\n",
      name, h.layout_version, h.header_bytes, h.checksum, h.segment_bytes, h.block_count,
      h.block_bytes, h.data_offset, (h.flags & kFlagHugePages) ? ", huge pages requested" : "",
      h.max_sequences, h.max_owners, FormatTime(h.created_unix_ns));
  absl::StrAppendFormat(&out,
                        "usage\n  blocks: %d total, %d used, %d free\n  sequences: %d, owners: %d\n"
                        "  reclaimed: %d blocks, %d sequences, %d owners; repaired %d sequences; "
                        "%d lock recoveries\n",
                        st.total_blocks, st.used_blocks, st.free_blocks, st.sequences, st.owners,
                        st.reclaimed_blocks, st.reclaimed_sequences, st.reclaimed_owners,
                        st.repaired_sequences, st.lock_recoveries);
  absl::StrAppend(&out, "owners\n");
  if (s.owners.empty()) absl::StrAppend(&out, "  (none)\n");
  for (const OwnerInfo& o : s.owners) {
    absl::StrAppendFormat(&out,
                          "  slot %u pid %d gen %d %s label '%s' attached %s heartbeat %.1fs ago\n",
                          o.slot, o.pid, o.generation, o.alive ? "alive" : "DEAD", o.label,
                          FormatTime(o.attach_unix_ns), AgeSeconds(o.heartbeat_unix_ns));
  }
  absl::StrAppend(&out, "sequences\n");
  if (s.sequences.empty()) absl::StrAppend(&out, "  (none)\n");
  for (const SequenceInfo& q : s.sequences) {
    absl::StrAppendFormat(&out, "  id %d owner slot %u tokens %d blocks %d\n", q.id, q.owner_slot,
                          q.token_count, q.blocks.size());
  }
  return out;
}

std::string FormatSnapshotJson(const std::string& name, const Snapshot& s) {
  const SegmentHeader& h = s.header;
  const KvStoreStats& st = s.stats;
  nlohmann::json j;
  j["name"] = name;
  j["header"] = {{"layout_version", h.layout_version},
                 {"header_bytes", h.header_bytes},
                 {"segment_bytes", h.segment_bytes},
                 {"block_bytes", h.block_bytes},
                 {"block_count", h.block_count},
                 {"max_sequences", h.max_sequences},
                 {"max_owners", h.max_owners},
                 {"huge_pages", (h.flags & kFlagHugePages) != 0},
                 {"data_offset", h.data_offset},
                 {"created", FormatTime(h.created_unix_ns)},
                 {"checksum", absl::StrFormat("%08x", h.checksum)}};
  j["usage"] = {{"total_blocks", st.total_blocks},
                {"used_blocks", st.used_blocks},
                {"free_blocks", st.free_blocks},
                {"sequences", st.sequences},
                {"owners", st.owners},
                {"reclaimed_blocks", st.reclaimed_blocks},
                {"reclaimed_sequences", st.reclaimed_sequences},
                {"reclaimed_owners", st.reclaimed_owners},
                {"repaired_sequences", st.repaired_sequences},
                {"lock_recoveries", st.lock_recoveries}};
  j["owners"] = nlohmann::json::array();
  for (const OwnerInfo& o : s.owners) {
    j["owners"].push_back({{"slot", o.slot},
                           {"pid", o.pid},
                           {"generation", o.generation},
                           {"label", o.label},
                           {"alive", o.alive},
                           {"attached", FormatTime(o.attach_unix_ns)},
                           {"heartbeat_age_s", AgeSeconds(o.heartbeat_unix_ns)}});
  }
  j["sequences"] = nlohmann::json::array();
  for (const SequenceInfo& q : s.sequences) {
    j["sequences"].push_back({{"id", q.id},
                              {"owner_slot", q.owner_slot},
                              {"tokens", q.token_count},
                              {"blocks", q.blocks}});
  }
  // Labels are raw bytes from shared memory: replace invalid UTF-8 rather than throw.
  return j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace specontext::kvstore
