// Contiguous runs of blocks (KvStore::AllocateRun / FreeRun, what backs a host KV tier layer): a random
// operation sequence against a model (runs are contiguous, never overlap, keep their bytes), first-fit
// failure on a fragmented segment changes nothing, ownership and range errors, and a process killed in
// the middle of an AllocateRun leaves no block behind.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kvstore/test_util.h"

namespace specontext::kvstore {
namespace {

using ::specontext::kvstore::testing::FreshSeed;
using ::specontext::kvstore::testing::Options;
using ::specontext::kvstore::testing::ScopedSegmentName;
using ::testing::HasSubstr;

struct BlockRun {
  uint64_t seq;
  uint32_t first, n;
  uint8_t fill;
};

void Fill(KvStore& s, const BlockRun& r) {
  std::memset(s.data_base() + uint64_t{r.first} * s.block_bytes(), r.fill, uint64_t{r.n} * s.block_bytes());
}

bool Intact(KvStore& s, const BlockRun& r) {
  const uint8_t* p = s.data_base() + uint64_t{r.first} * s.block_bytes();
  for (uint64_t i = 0; i < uint64_t{r.n} * s.block_bytes(); ++i) {
    if (p[i] != r.fill) return false;
  }
  return true;
}

TEST(RunTest, RandomRunsMatchModel) {
  ScopedSegmentName name("runs");
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  const uint32_t total = 50 + rng() % 150;
  auto opened = KvStore::Open(Options(name.str(), total, 64 * (1 + rng() % 4)));
  ASSERT_TRUE(opened.ok()) << opened.status();
  KvStore& s = **opened;
  std::vector<BlockRun> runs;
  std::map<uint64_t, std::set<uint32_t>> model;  // sequence -> its blocks
  uint64_t used = 0;
  for (int op = 0; op < 600; ++op) {
    const int kind = static_cast<int>(rng() % 10);
    if (kind < 5) {  // allocate a run
      const uint64_t seq = 1 + rng() % 6;
      const uint32_t n = 1 + static_cast<uint32_t>(rng() % 12);
      absl::StatusOr<uint32_t> first = s.AllocateRun(seq, n);
      if (!first.ok()) {
        ASSERT_EQ(first.status().code(), absl::StatusCode::kResourceExhausted) << first.status();
        continue;
      }
      ASSERT_LE(*first + n, total);
      BlockRun r{seq, *first, n, static_cast<uint8_t>(1 + rng() % 255)};
      for (uint32_t b = r.first; b < r.first + n; ++b) {
        for (const auto& [q, blocks] : model) ASSERT_FALSE(blocks.contains(b)) << "block " << b << " handed out twice";
        model[seq].insert(b);
      }
      Fill(s, r);
      runs.push_back(r);
      used += n;
    } else if (kind < 8 && !runs.empty()) {  // free a run
      const size_t i = rng() % runs.size();
      const BlockRun r = runs[i];
      ASSERT_TRUE(Intact(s, r)) << "run [" << r.first << ", " << r.first + r.n << ") of sequence " << r.seq
                                << " was overwritten";
      ASSERT_TRUE(s.FreeRun(r.seq, r.first, r.n).ok());
      for (uint32_t b = r.first; b < r.first + r.n; ++b) model[r.seq].erase(b);
      runs.erase(runs.begin() + static_cast<long>(i));
      used -= r.n;
    } else if (kind == 8 && !model.empty()) {  // drop a whole sequence (its runs with it)
      const uint64_t seq = model.begin()->first;
      ASSERT_TRUE(s.FreeSequence(seq).ok());
      used -= model[seq].size();
      model.erase(seq);
      std::erase_if(runs, [seq](const BlockRun& r) { return r.seq == seq; });
    } else {  // block-list order: every run of a sequence appears in it, consecutively
      for (const auto& [seq, blocks] : model) {
        auto info = s.GetSequence(seq);
        ASSERT_TRUE(info.ok()) << info.status();
        ASSERT_EQ(std::set<uint32_t>(info->blocks.begin(), info->blocks.end()), blocks);
      }
    }
    auto stats = s.Stats();
    ASSERT_TRUE(stats.ok());
    ASSERT_EQ(stats->used_blocks, used) << "op " << op;
    ASSERT_TRUE(s.CheckConsistency().ok()) << s.CheckConsistency() << " after op " << op;
  }
  for (const BlockRun& r : runs) EXPECT_TRUE(Intact(s, r));
}

TEST(RunTest, FragmentedSegmentRefusesAndChangesNothing) {
  ScopedSegmentName name("frag");
  std::mt19937_64 rng(FreshSeed());
  const uint32_t piece = 2 + rng() % 3;
  auto opened = KvStore::Open(Options(name.str(), 4 * piece, 64));
  ASSERT_TRUE(opened.ok());
  KvStore& s = **opened;
  // A B A B: freeing A leaves 2 * piece free blocks, never more than `piece` in a row.
  std::vector<uint32_t> firsts;
  for (uint64_t seq : {1, 2, 1, 2}) {
    auto f = s.AllocateRun(seq, piece);
    ASSERT_TRUE(f.ok()) << f.status();
    firsts.push_back(*f);
  }
  EXPECT_EQ(s.AllocateRun(3, 1).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(s.FreeSequence(1).ok());
  auto before = s.Inspect();
  ASSERT_TRUE(before.ok());
  absl::StatusOr<uint32_t> big = s.AllocateRun(3, piece + 1);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("fragmented"));
  auto after = s.Inspect();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->stats.free_blocks, before->stats.free_blocks);
  EXPECT_EQ(after->sequences.size(), before->sequences.size());
  EXPECT_EQ(s.GetSequence(3).status().code(), absl::StatusCode::kNotFound);
  // Exactly a piece fits, at the lowest free run (first fit).
  auto fit = s.AllocateRun(3, piece);
  ASSERT_TRUE(fit.ok()) << fit.status();
  EXPECT_EQ(*fit, std::min(firsts[0], firsts[2]));
  EXPECT_TRUE(s.CheckConsistency().ok());
}

TEST(RunTest, FreeRunChecksOwnershipAndRange) {
  ScopedSegmentName name("own");
  auto a = KvStore::Open(Options(name.str(), 32, 64));
  ASSERT_TRUE(a.ok());
  auto b = KvStore::Open(Options(name.str(), 32, 64, OpenMode::kAttach));
  ASSERT_TRUE(b.ok());
  auto ra = (*a)->AllocateRun(1, 4);
  auto rb = (*a)->AllocateRun(2, 3);
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_EQ((*a)->FreeRun(1, *rb, 1).code(), absl::StatusCode::kInvalidArgument);  // sequence 2's block
  EXPECT_EQ((*a)->FreeRun(1, *ra, 5).code(), absl::StatusCode::kInvalidArgument);   // one past the run
  EXPECT_EQ((*a)->FreeRun(1, 30, 5).code(), absl::StatusCode::kInvalidArgument);    // past the segment
  EXPECT_EQ((*a)->FreeRun(1, *ra, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*b)->FreeRun(1, *ra, 4).code(), absl::StatusCode::kPermissionDenied);  // another owner's
  EXPECT_EQ((*b)->AllocateRun(1, 1).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ((*a)->AllocateRun(1, 0).status().code(), absl::StatusCode::kInvalidArgument);
  // Freeing the middle of a sequence keeps the rest in order.
  ASSERT_TRUE((*a)->FreeRun(1, *ra + 1, 2).ok());
  auto info = (*a)->GetSequence(1);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->blocks, (std::vector<uint32_t>{*ra, *ra + 3}));
  EXPECT_TRUE((*a)->CheckConsistency().ok());
}

// A process SIGKILLed inside AllocateRun (blocks marked, list half linked, free list stale): the next
// locker repairs, and every block is free again once the dead owner is reclaimed.
TEST(RunTest, KilledInsideAllocateRunLeaksNothing) {
  ScopedSegmentName name("kill");
  std::mt19937_64 rng(FreshSeed());
  const uint32_t total = 40 + rng() % 40, n = 3 + rng() % 8, die_at = 1 + rng() % n;
  auto parent = KvStore::Open(Options(name.str(), total, 64));
  ASSERT_TRUE(parent.ok());
  ASSERT_TRUE((*parent)->AllocateRun(1, 2).ok());
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    KvStoreOptions o = Options(name.str(), total, 64, OpenMode::kAttach);
    bool armed = false;
    o.apply_hook_for_testing = [&armed, die_at](uint32_t step) {
      if (armed && step == die_at) ::raise(SIGKILL);
    };
    auto s = KvStore::Open(o);
    if (!s.ok()) ::_exit(1);
    if (!(*s)->AllocateRun(7, 1).ok()) ::_exit(3);  // the sequence exists: the kill hits an append
    armed = true;
    (*s)->AllocateRun(7, n).IgnoreError();
    ::_exit(2);
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited with " << WEXITSTATUS(wstatus);
  auto stats = (*parent)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->lock_recoveries, 1u);
  EXPECT_EQ(stats->used_blocks, 2u);  // the parent's run only
  EXPECT_EQ(stats->free_blocks, total - 2);
  EXPECT_TRUE((*parent)->CheckConsistency().ok()) << (*parent)->CheckConsistency();
  auto again = (*parent)->AllocateRun(2, total - 2 - 1);
  EXPECT_TRUE(again.ok()) << again.status();
}

}  // namespace
}  // namespace specontext::kvstore
