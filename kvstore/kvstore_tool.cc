// specontext-kvstore: create, inspect, reclaim and remove kvstore shared-memory segments.
//   specontext-kvstore create --name N --blocks B --block-size BYTES [--max-sequences S]
//                             [--max-owners O] [--huge-pages]
//   specontext-kvstore inspect --name N [--json]
//   specontext-kvstore reclaim --name N
//   specontext-kvstore remove --name N
// Exit status: 0 on success, 1 when the operation failed, 2 on a usage error.
#include <cstdio>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvstore/kv_store.h"
#include "kvstore/kvstore_inspect.h"

namespace {

using specontext::kvstore::Geometry;
using specontext::kvstore::KvStore;
using specontext::kvstore::KvStoreOptions;
using specontext::kvstore::OpenMode;

constexpr char kUsage[] =
    "usage:\n"
    "  specontext-kvstore create --name N --blocks B --block-size BYTES [--max-sequences S]\n"
    "                            [--max-owners O] [--huge-pages]\n"
    "  specontext-kvstore inspect --name N [--json]\n"
    "  specontext-kvstore reclaim --name N\n"
    "  specontext-kvstore remove --name N\n"
    "BYTES may end in K, M or G (powers of 1024).\n";

int Usage(const std::string& msg) {
  std::fprintf(stderr, "specontext-kvstore: %s\n%s", msg.c_str(), kUsage);
  return 2;
}

int Fail(const absl::Status& st) {
  std::fprintf(stderr, "specontext-kvstore: %s\n", std::string(st.message()).c_str());
  return 1;
}

// Parses "4096", "64K", "2M", "1G".
bool ParseBytes(std::string text, uint64_t* out) {
  uint64_t mult = 1;
  if (!text.empty()) {
    const char c = text.back();
    if (c == 'K' || c == 'k') mult = 1ull << 10;
    if (c == 'M' || c == 'm') mult = 1ull << 20;
    if (c == 'G' || c == 'g') mult = 1ull << 30;
    if (mult != 1) text.pop_back();
  }
  uint64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v > (~0ull) / mult) return false;
  *out = v * mult;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage("missing command");
  const std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::map<std::string, std::string> flags;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--huge-pages" || a == "--json") {
      flags.insert_or_assign(a, std::string(1, '1'));  // (plain = "1" trips GCC 12 -Wrestrict)
    } else if (a == "--name" || a == "--blocks" || a == "--block-size" || a == "--max-sequences" ||
               a == "--max-owners") {
      if (i + 1 >= argc) return Usage(absl::StrCat(a, " needs a value"));
      flags[a] = argv[++i];
    } else {
      return Usage(absl::StrCat("unknown argument '", a, "'"));
    }
  }
  if (!flags.count("--name")) return Usage("--name is required");
  const std::string name = flags["--name"];

  if (cmd == "create") {
    Geometry g;
    if (!flags.count("--blocks") || !ParseBytes(flags["--blocks"], &g.block_count)) {
      return Usage("--blocks needs a positive integer");
    }
    if (!flags.count("--block-size") || !ParseBytes(flags["--block-size"], &g.block_bytes)) {
      return Usage("--block-size needs a byte count");
    }
    uint64_t v;
    if (flags.count("--max-sequences")) {
      if (!ParseBytes(flags["--max-sequences"], &v) || v > 0xFFFFFFFFull) {
        return Usage("--max-sequences needs a positive integer");
      }
      g.max_sequences = static_cast<uint32_t>(v);
    }
    if (flags.count("--max-owners")) {
      if (!ParseBytes(flags["--max-owners"], &v) || v > 0xFFFFFFFFull) {
        return Usage("--max-owners needs a positive integer");
      }
      g.max_owners = static_cast<uint32_t>(v);
    }
    g.huge_pages = flags.count("--huge-pages") > 0;
    KvStoreOptions o;
    o.name = name;
    o.mode = OpenMode::kCreate;
    o.geometry = g;
    o.register_owner = false;
    o.lock_timeout = absl::Seconds(2);  // a look must not wait long behind a stopped process
    auto store = KvStore::Open(o);
    if (!store.ok()) return Fail(store.status());
    std::printf("created %s: %llu blocks x %llu bytes, %zu bytes mapped%s\n",
                (*store)->name().c_str(), static_cast<unsigned long long>(g.block_count),
                static_cast<unsigned long long>(g.block_bytes), (*store)->mapping_bytes(),
                g.huge_pages
                    ? ((*store)->huge_pages_active() ? ", huge pages"
                                                     : ", huge pages unavailable (THP advice)")
                    : "");
    return 0;
  }
  if (cmd == "inspect" || cmd == "reclaim") {
    KvStoreOptions o;
    o.name = name;
    o.mode = OpenMode::kAttach;
    o.register_owner = cmd == "reclaim";  // reclaiming needs an owner slot (released on exit)
    auto store = KvStore::Open(o);
    if (!store.ok()) return Fail(store.status());
    if (cmd == "reclaim") {
      const auto& r = (*store)->attach_reclaim();
      std::printf("reclaimed %llu blocks, %llu sequences, %llu owners\n",
                  static_cast<unsigned long long>(r.blocks),
                  static_cast<unsigned long long>(r.sequences),
                  static_cast<unsigned long long>(r.owners));
      return 0;
    }
    auto snap = (*store)->Inspect();
    if (!snap.ok()) return Fail(snap.status());
    const std::string text = flags.count("--json")
                                 ? specontext::kvstore::FormatSnapshotJson((*store)->name(), *snap)
                                 : specontext::kvstore::FormatSnapshotText((*store)->name(), *snap);
    std::fputs(text.c_str(), stdout);
    return 0;
  }
  if (cmd == "remove") {
    absl::Status st = KvStore::Remove(name);
    if (!st.ok()) return Fail(st);
    std::printf("removed %s\n", name.c_str());
    return 0;
  }
  return Usage(absl::StrCat("unknown command '", cmd, "'"));
}
