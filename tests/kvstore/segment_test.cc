// Segment creation/attach, header validation (every corruption is an error, never a crash),
// geometry checks, names, block addresses and the inspect renderings.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/crc32c.h"
#include "kvstore/kvstore_inspect.h"
#include "nlohmann/json.hpp"
#include "tests/kvstore/test_util.h"

namespace specontext::kvstore {
namespace {

using ::specontext::kvstore::testing::FreshSeed;
using ::specontext::kvstore::testing::Options;
using ::specontext::kvstore::testing::ScopedSegmentName;
using ::testing::HasSubstr;

TEST(Crc32cTest, KnownVectorAndIncremental) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c("", 0), 0u);
  std::mt19937_64 rng(FreshSeed());
  std::vector<unsigned char> buf(1 + rng() % 300);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  const size_t cut = rng() % buf.size();
  EXPECT_EQ(Crc32c(buf.data(), buf.size()),
            Crc32c(buf.data() + cut, buf.size() - cut, Crc32c(buf.data(), cut)));
  buf[cut] ^= 0x10;  // one flipped bit changes the checksum
  const uint32_t flipped = Crc32c(buf.data(), buf.size());
  buf[cut] ^= 0x10;
  EXPECT_NE(flipped, Crc32c(buf.data(), buf.size()));
}

TEST(SegmentTest, CreateAttachSharesDataAndGeometry) {
  ScopedSegmentName name("share");
  std::mt19937_64 rng(FreshSeed());
  const uint64_t blocks = 3 + rng() % 60;
  const uint64_t bytes = 64 * (1 + rng() % 40);
  auto a = KvStore::Open(Options(name.str(), blocks, bytes, OpenMode::kCreate));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE((*a)->created());
  auto b = KvStore::Open(Options(name.str(), blocks, bytes, OpenMode::kAttach));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_FALSE((*b)->created());
  EXPECT_TRUE((*b)->geometry().SameShape((*a)->geometry()));
  EXPECT_NE((*a)->owner_slot(), (*b)->owner_slot());
  // The data area lies inside the mapping, page aligned, and both handles see the same bytes.
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*a)->data_base()) % 4096, 0u);
  EXPECT_LE((*a)->data_base() + (*a)->data_bytes(),
            static_cast<uint8_t*>((*a)->mapping_base()) + (*a)->mapping_bytes());
  const uint32_t blk = static_cast<uint32_t>(rng() % blocks);
  auto pa = (*a)->BlockData(blk);
  auto pb = (*b)->BlockData(blk);
  ASSERT_TRUE(pa.ok() && pb.ok());
  EXPECT_EQ(*pa, (*a)->data_base() + blk * bytes);
  std::vector<uint8_t> pattern(bytes);
  for (auto& x : pattern) x = static_cast<uint8_t>(rng());
  std::memcpy(*pa, pattern.data(), bytes);
  EXPECT_EQ(std::memcmp(*pb, pattern.data(), bytes), 0);
  EXPECT_EQ((*a)->BlockData(static_cast<uint32_t>(blocks)).status().code(),
            absl::StatusCode::kOutOfRange);
}

TEST(SegmentTest, ModesAndNames) {
  ScopedSegmentName name("modes");
  EXPECT_EQ(KvStore::Open(Options(name.str(), 8, 64, OpenMode::kAttach)).status().code(),
            absl::StatusCode::kNotFound);
  auto a = KvStore::Open(Options(name.str(), 8, 64, OpenMode::kCreate));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(KvStore::Open(Options(name.str(), 8, 64, OpenMode::kCreate)).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(KvStore::Open(Options("a/b", 8, 64)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvStore::Open(Options("", 8, 64)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvStore::Open(Options(std::string(300, 'x'), 8, 64)).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(KvStore::Remove(name.str()).ok());
  EXPECT_EQ(KvStore::Remove(name.str()).code(), absl::StatusCode::kNotFound);
}

TEST(SegmentTest, BadGeometryIsRejected) {
  ScopedSegmentName name("badgeo");
  auto status_of = [&](uint64_t blocks, uint64_t bytes) {
    return KvStore::Open(Options(name.str(), blocks, bytes)).status();
  };
  EXPECT_THAT(status_of(0, 64).message(), HasSubstr("block count"));
  EXPECT_THAT(status_of(4, 100).message(), HasSubstr("multiple of 64"));
  EXPECT_THAT(status_of(4, 0).message(), HasSubstr("multiple of 64"));
  EXPECT_THAT(status_of(1ull << 40, 1ull << 20).message(), HasSubstr("block count"));
  KvStoreOptions o = Options(name.str(), 4, 64);
  o.geometry->max_owners = 0;
  EXPECT_EQ(KvStore::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(name.str(), 4, 64);
  o.geometry.reset();
  EXPECT_EQ(KvStore::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
  // Nothing was left behind by the failed creations.
  EXPECT_EQ(KvStore::Remove(name.str()).code(), absl::StatusCode::kNotFound);
}

TEST(SegmentTest, GeometryMismatchIsRefused) {
  ScopedSegmentName name("mismatch");
  auto a = KvStore::Open(Options(name.str(), 16, 128, OpenMode::kCreate));
  ASSERT_TRUE(a.ok()) << a.status();
  for (auto [blocks, bytes] : {std::pair<uint64_t, uint64_t>{17, 128}, {16, 192}}) {
    for (OpenMode mode : {OpenMode::kAttach, OpenMode::kCreateOrAttach}) {
      auto b = KvStore::Open(Options(name.str(), blocks, bytes, mode));
      ASSERT_FALSE(b.ok());
      EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_THAT(b.status().message(), HasSubstr("geometry"));
    }
  }
  KvStoreOptions o = Options(name.str(), 16, 128, OpenMode::kAttach);
  o.geometry->max_sequences += 1;
  EXPECT_EQ(KvStore::Open(o).status().code(), absl::StatusCode::kFailedPrecondition);
  o.geometry.reset();  // no expectation: any valid segment is accepted
  auto c = KvStore::Open(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->geometry().block_count, 16u);
}

// Rewrites the header of segment `name` through a plain fd (as a stray writer would).
void PatchHeader(const std::string& name, const std::function<void(SegmentHeader*)>& patch) {
  const int fd = ::shm_open(("/" + name).c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  SegmentHeader h;
  ASSERT_EQ(::pread(fd, &h, sizeof(h), 0), static_cast<ssize_t>(sizeof(h)));
  patch(&h);
  ASSERT_EQ(::pwrite(fd, &h, sizeof(h), 0), static_cast<ssize_t>(sizeof(h)));
  ::close(fd);
}

struct CorruptionCase {
  const char* what;
  std::function<void(const std::string&)> corrupt;
  absl::StatusCode code;
  const char* message;
};

TEST(SegmentTest, CorruptHeadersAreErrorsNotCrashes) {
  std::mt19937_64 rng(FreshSeed());
  const std::vector<CorruptionCase> cases = {
      {"magic",
       [](const std::string& n) { PatchHeader(n, [](SegmentHeader* h) { h->magic[3] ^= 1; }); },
       absl::StatusCode::kInvalidArgument, "bad magic"},
      {"version",
       [](const std::string& n) {
         PatchHeader(n, [](SegmentHeader* h) {
           h->layout_version = kLayoutVersion + 1;
           h->checksum = HeaderChecksum(*h);
         });
       },
       absl::StatusCode::kFailedPrecondition, "layout version"},
      {"block count without checksum",
       [](const std::string& n) { PatchHeader(n, [](SegmentHeader* h) { h->block_count += 1; }); },
       absl::StatusCode::kDataLoss, "checksum"},
      {"checksum field",
       [](const std::string& n) { PatchHeader(n, [](SegmentHeader* h) { h->checksum ^= 0x40; }); },
       absl::StatusCode::kDataLoss, "checksum"},
      {"creation time",
       [](const std::string& n) {
         PatchHeader(n, [](SegmentHeader* h) { h->created_unix_ns ^= 1; });
       },
       absl::StatusCode::kDataLoss, "checksum"},
      {"offsets with a valid checksum",
       [](const std::string& n) {
         PatchHeader(n, [](SegmentHeader* h) {
           h->data_offset += 4096;
           h->checksum = HeaderChecksum(*h);
         });
       },
       absl::StatusCode::kDataLoss, "offsets"},
      {"absurd geometry with a valid checksum",
       [](const std::string& n) {
         PatchHeader(n, [](SegmentHeader* h) {
           h->block_bytes = 3;
           h->checksum = HeaderChecksum(*h);
         });
       },
       absl::StatusCode::kDataLoss, "geometry is invalid"},
      {"mutex ABI",
       [](const std::string& n) {
         PatchHeader(n, [](SegmentHeader* h) {
           h->mutex_bytes += 8;
           h->checksum = HeaderChecksum(*h);
         });
       },
       absl::StatusCode::kFailedPrecondition, "mutex"},
      {"truncated",
       [](const std::string& n) {
         const int fd = ::shm_open(("/" + n).c_str(), O_RDWR, 0);
         ASSERT_EQ(::ftruncate(fd, 8192), 0);
         ::close(fd);
       },
       absl::StatusCode::kDataLoss, "bytes but its header says"},
      {"random garbage",
       [&rng](const std::string& n) {
         PatchHeader(n, [&rng](SegmentHeader* h) {
           auto* p = reinterpret_cast<unsigned char*>(h);
           for (size_t i = 0; i < sizeof(*h); ++i) p[i] = static_cast<unsigned char>(rng() | 1);
         });
       },
       absl::StatusCode::kInvalidArgument, "bad magic"},
      {"never initialised",
       [](const std::string& n) {
         const int fd = ::shm_open(("/" + n).c_str(), O_RDWR, 0);
         ASSERT_EQ(::ftruncate(fd, 0), 0);
         ::close(fd);
       },
       absl::StatusCode::kFailedPrecondition, "not initialised"},
  };
  for (const CorruptionCase& c : cases) {
    SCOPED_TRACE(c.what);
    ScopedSegmentName name("corrupt");
    {
      auto a = KvStore::Open(Options(name.str(), 32, 256, OpenMode::kCreate));
      ASSERT_TRUE(a.ok()) << a.status();
    }
    c.corrupt(name.str());
    for (bool with_geometry : {true, false}) {
      KvStoreOptions o = Options(name.str(), 32, 256, OpenMode::kAttach);
      if (!with_geometry) o.geometry.reset();
      o.init_wait = absl::Milliseconds(50);
      auto b = KvStore::Open(o);
      ASSERT_FALSE(b.ok());
      EXPECT_EQ(b.status().code(), c.code) << b.status();
      EXPECT_THAT(b.status().message(), HasSubstr(c.message));
    }
    // A generator would not silently recreate over it either.
    KvStoreOptions again = Options(name.str(), 32, 256);
    again.init_wait = absl::Milliseconds(50);
    EXPECT_FALSE(KvStore::Open(again).ok());
  }
}

TEST(SegmentTest, HugePagesAlignDataAndStillAttach) {
  ScopedSegmentName name("huge");
  KvStoreOptions o = Options(name.str(), 3, 4096, OpenMode::kCreate);
  o.geometry->huge_pages = true;
  auto a = KvStore::Open(o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE((*a)->geometry().huge_pages);
  EXPECT_EQ((*a)->mapping_bytes() % kHugePageBytes, 0u);
  EXPECT_EQ(((*a)->data_base() - static_cast<uint8_t*>((*a)->mapping_base())) % kHugePageBytes, 0u);
  // Whether MAP_HUGETLB worked depends on the host; either way a plain attach works.
  o.mode = OpenMode::kAttach;
  auto b = KvStore::Open(o);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE((*b)->Allocate(1, 3).ok());
  std::memset((*b)->data_base(), 0x5a, (*b)->data_bytes());
  EXPECT_EQ((*a)->data_base()[(*a)->data_bytes() - 1], 0x5a);
}

TEST(SegmentTest, HeartbeatIsVisibleToOthers) {
  ScopedSegmentName name("heartbeat");
  auto a = KvStore::Open(Options(name.str(), 4, 64));
  ASSERT_TRUE(a.ok()) << a.status();
  auto first = (*a)->Inspect();
  ASSERT_TRUE(first.ok());
  absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE((*a)->Heartbeat().ok());
  KvStoreOptions o = Options(name.str(), 4, 64, OpenMode::kAttach);
  o.register_owner = false;
  auto obs = KvStore::Open(o);
  ASSERT_TRUE(obs.ok()) << obs.status();
  auto later = (*obs)->Inspect();
  ASSERT_TRUE(later.ok());
  ASSERT_EQ(later->owners.size(), 1u);
  EXPECT_GT(later->owners[0].heartbeat_unix_ns, first->owners[0].heartbeat_unix_ns);
  EXPECT_FALSE(later->owners[0].is_self);
}

TEST(SegmentTest, InspectRenderings) {
  ScopedSegmentName name("inspect");
  KvStoreOptions o = Options(name.str(), 20, 128);
  o.owner_label = "unit-test";
  auto a = KvStore::Open(o);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE((*a)->Allocate(77, 5).ok());
  ASSERT_TRUE((*a)->SetTokenCount(77, 321).ok());
  auto snap = (*a)->Inspect();
  ASSERT_TRUE(snap.ok()) << snap.status();
  const std::string text = FormatSnapshotText((*a)->name(), *snap);
  EXPECT_THAT(text, HasSubstr("blocks: 20 total, 5 used, 15 free"));
  EXPECT_THAT(text, HasSubstr("alive label 'unit-test'"));
  EXPECT_THAT(text, HasSubstr("id 77 owner slot"));
  auto j = nlohmann::json::parse(FormatSnapshotJson((*a)->name(), *snap));
  EXPECT_EQ(j["header"]["block_count"], 20);
  EXPECT_EQ(j["usage"]["used_blocks"], 5);
  EXPECT_EQ(j["owners"][0]["alive"], true);
  EXPECT_EQ(j["sequences"][0]["tokens"], 321);
  EXPECT_EQ(j["sequences"][0]["blocks"].size(), 5u);
}

}  // namespace
}  // namespace specontext::kvstore
