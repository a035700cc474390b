// Several processes on one segment: concurrent owners via fork, and owners killed with SIGKILL
// while holding blocks or the segment mutex, after which a new attach reclaims everything.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/process_liveness.h"
#include "tests/kvstore/test_util.h"

namespace specontext::kvstore {
namespace {

using ::specontext::kvstore::testing::FreshSeed;
using ::specontext::kvstore::testing::Options;
using ::specontext::kvstore::testing::ScopedSegmentName;

// A forked child running `body` (its return value is the exit code; _exit skips gtest teardown).
// The child reports progress over a pipe: one byte per Signal().
class Child {
 public:
  template <typename F>
  explicit Child(F body) {
    int up[2], down[2];
    EXPECT_EQ(::pipe(up), 0);
    EXPECT_EQ(::pipe(down), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(up[0]);
      ::close(down[1]);
      to_parent_ = up[1];
      from_parent_ = down[0];
      ::_exit(body(*this));
    }
    ::close(up[1]);
    ::close(down[0]);
    from_child_ = up[0];
    to_child_ = down[1];
  }
  ~Child() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      Wait();
    }
    ::close(from_child_);
    ::close(to_child_);
  }
  // Child side.
  void Signal(char c = 's') { (void)!::write(to_parent_, &c, 1); }
  char AwaitParent() {
    char c = 0;
    return ::read(from_parent_, &c, 1) == 1 ? c : 0;
  }
  // Parent side.
  char AwaitChild() {
    char c = 0;
    return ::read(from_child_, &c, 1) == 1 ? c : 0;
  }
  void Tell(char c = 'g') { (void)!::write(to_child_, &c, 1); }
  void Kill() { ::kill(pid_, SIGKILL); }
  int Wait() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    reaped_ = true;
    return status;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int to_parent_ = -1, from_parent_ = -1, from_child_ = -1, to_child_ = -1;
};

// Fills `n` blocks of sequence `id` with bytes derived from `seed`; returns false on any error.
bool AllocateAndFill(KvStore* s, uint64_t id, uint32_t n, uint64_t seed) {
  if (!s->Allocate(id, n).ok()) return false;
  auto info = s->GetSequence(id);
  if (!info.ok()) return false;
  std::mt19937_64 rng(seed);
  for (uint32_t b : info->blocks) {
    auto p = s->BlockData(b);
    if (!p.ok()) return false;
    for (uint64_t i = 0; i < s->block_bytes(); ++i) (*p)[i] = static_cast<uint8_t>(rng());
  }
  return true;
}

bool CheckFill(KvStore* s, uint64_t id, uint64_t seed) {
  auto info = s->GetSequence(id);
  if (!info.ok()) return false;
  std::mt19937_64 rng(seed);
  for (uint32_t b : info->blocks) {
    const uint8_t* p = *s->BlockData(b);
    for (uint64_t i = 0; i < s->block_bytes(); ++i) {
      if (p[i] != static_cast<uint8_t>(rng())) return false;
    }
  }
  return true;
}

TEST(MultiProcessTest, LivenessOfSelfChildAndReusedPid) {
  EXPECT_TRUE(IsProcessAlive(::getpid(), ProcessStartTicks(::getpid())));
  EXPECT_NE(ProcessStartTicks(::getpid()), 0u);
  // Same pid, different start time: a reused pid is not the original owner.
  EXPECT_FALSE(IsProcessAlive(::getpid(), ProcessStartTicks(::getpid()) + 1));
  Child child([](Child& c) {
    c.AwaitParent();
    return 0;
  });
  EXPECT_TRUE(IsProcessAlive(child.pid(), ProcessStartTicks(child.pid())));
  const uint64_t ticks = ProcessStartTicks(child.pid());
  child.Kill();
  // Killed but not yet reaped (a zombie) already counts as dead.
  for (int i = 0; i < 1000 && IsProcessAlive(child.pid(), ticks); ++i) ::usleep(1000);
  EXPECT_FALSE(IsProcessAlive(child.pid(), ticks));
  child.Wait();
  EXPECT_FALSE(IsProcessAlive(child.pid(), ticks));
}

TEST(MultiProcessTest, TwoProcessesShareOneSegment) {
  ScopedSegmentName name("two");
  const uint64_t seed = FreshSeed();
  auto parent = KvStore::Open(Options(name.str(), 64, 256));
  ASSERT_TRUE(parent.ok()) << parent.status();
  ASSERT_TRUE(AllocateAndFill(parent->get(), 1, 10, seed));
  Child child([&](Child& c) {
    auto s = KvStore::Open(Options(name.str(), 64, 256, OpenMode::kAttach));
    if (!s.ok() || !AllocateAndFill(s->get(), 2, 20, seed + 1)) return 1;
    if (!CheckFill(s->get(), 1, seed)) return 2;  // sees the parent's data
    c.Signal();
    c.AwaitParent();
    return (*s)->Close().ok() ? 0 : 3;
  });
  ASSERT_EQ(child.AwaitChild(), 's');
  auto stats = (*parent)->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->owners, 2u);
  EXPECT_EQ(stats->used_blocks, 30u);
  EXPECT_TRUE(CheckFill(parent->get(), 2, seed + 1));
  auto snap = (*parent)->Inspect();
  ASSERT_TRUE(snap.ok());
  for (const OwnerInfo& o : snap->owners) EXPECT_TRUE(o.alive);
  child.Tell();
  const int status = child.Wait();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  stats = (*parent)->Stats();
  EXPECT_EQ(stats->used_blocks, 10u);
  EXPECT_EQ(stats->owners, 1u);
  EXPECT_EQ(stats->reclaimed_blocks, 0u);
  EXPECT_TRUE((*parent)->CheckConsistency().ok());
}

TEST(MultiProcessTest, ConcurrentProcessesKeepInvariants) {
  ScopedSegmentName name("stress");
  const uint64_t seed = FreshSeed();
  auto parent = KvStore::Open(Options(name.str(), 301, 64));
  ASSERT_TRUE(parent.ok()) << parent.status();
  std::vector<std::unique_ptr<Child>> children;
  for (int k = 0; k < 4; ++k) {
    children.push_back(std::make_unique<Child>([&, k](Child& c) {
      auto s = KvStore::Open(Options(name.str(), 301, 64, OpenMode::kAttach));
      if (!s.ok()) return 1;
      std::mt19937_64 rng(seed + k);
      for (int i = 0; i < 500; ++i) {
        const uint64_t id = 1000 * (k + 1) + rng() % 5;
        if (rng() % 3 == 0) {
          (void)(*s)->FreeSequence(id);
        } else {
          (void)(*s)->Allocate(id, static_cast<uint32_t>(rng() % 7));
        }
      }
      if (!(*s)->CheckConsistency().ok()) return 2;
      // Half the children exit without closing: their blocks must come back through reclaim.
      if (k % 2 == 0) ::_exit(0);
      return (*s)->Close().ok() ? 0 : 3;
    }));
  }
  for (auto& c : children) {
    const int status = c->Wait();
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
  ASSERT_TRUE((*parent)->ReclaimDead().ok());
  auto stats = (*parent)->Stats();
  EXPECT_EQ(stats->free_blocks, 301u);
  EXPECT_EQ(stats->owners, 1u);
  EXPECT_TRUE((*parent)->CheckConsistency().ok());
}

// The generator restart scenario: a process that owns blocks is SIGKILLed; a restarted process
// attaching with the same geometry reclaims every one of them.
TEST(MultiProcessTest, SigkilledOwnerIsReclaimedOnAttach) {
  ScopedSegmentName name("sigkill");
  std::mt19937_64 rng(FreshSeed());
  const uint32_t total = 50 + rng() % 100;
  const uint32_t seqs = 1 + rng() % 5;
  const uint32_t per_seq = 1 + rng() % (total / 10);
  auto parent = KvStore::Open(Options(name.str(), total, 128));
  ASSERT_TRUE(parent.ok());
  ASSERT_TRUE((*parent)->Allocate(1, 3).ok());
  Child child([&](Child& c) {
    auto s = KvStore::Open(Options(name.str(), total, 128));
    if (!s.ok()) return 1;
    for (uint32_t q = 0; q < seqs; ++q) {
      if (!(*s)->Allocate(100 + q, per_seq).ok()) return 2;
    }
    c.Signal();
    for (;;) ::pause();
  });
  ASSERT_EQ(child.AwaitChild(), 's');
  EXPECT_EQ((*parent)->Stats()->used_blocks, 3u + seqs * per_seq);
  child.Kill();
  child.Wait();
  auto restarted = KvStore::Open(Options(name.str(), total, 128));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  const ReclaimReport& r = (*restarted)->attach_reclaim();
  EXPECT_EQ(r.blocks, uint64_t{seqs} * per_seq);
  EXPECT_EQ(r.sequences, seqs);
  EXPECT_EQ(r.owners, 1u);
  auto stats = (*restarted)->Stats();
  EXPECT_EQ(stats->used_blocks, 3u);  // only the live parent's blocks remain
  EXPECT_EQ(stats->reclaimed_blocks, uint64_t{seqs} * per_seq);
  EXPECT_TRUE((*restarted)->GetSequence(1).ok());
  EXPECT_EQ((*restarted)->GetSequence(100).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE((*restarted)->CheckConsistency().ok());
}

// A holder that stops (SIGSTOP, a debugger) while it has the lock must not hang other processes:
// they fail with DeadlineExceeded after their lock timeout, and work again once the holder is gone.
TEST(MultiProcessTest, StoppedHolderTimesOutInsteadOfHanging) {
  ScopedSegmentName name("stopped");
  auto parent = KvStore::Open(Options(name.str(), 32, 256));
  ASSERT_TRUE(parent.ok());
  Child child([&](Child& c) {
    KvStoreOptions o = Options(name.str(), 32, 256, OpenMode::kAttach);
    o.apply_hook_for_testing = [&c](uint32_t) {
      c.Signal('m');  // holding the mutex now
      for (;;) ::pause();
    };
    auto s = KvStore::Open(o);
    if (!s.ok()) return 1;
    (*s)->Allocate(9, 2).IgnoreError();
    return 2;
  });
  ASSERT_EQ(child.AwaitChild(), 'm');
  KvStoreOptions look = Options(name.str(), 32, 256, OpenMode::kAttach);
  look.register_owner = false;
  look.lock_timeout = absl::Milliseconds(300);
  auto observer = KvStore::Open(look);
  const absl::Time start = absl::Now();
  absl::Status st = observer.ok() ? (*observer)->Stats().status() : observer.status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  child.Kill();
  child.Wait();
  auto stats = (*parent)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->used_blocks, 0u);
}

// A child dies while holding the segment mutex in the middle of an allocation (some blocks linked,
// free list half updated). The next locker gets EOWNERDEAD, repairs, and no block leaks.
TEST(MultiProcessTest, SigkillWhileHoldingTheMutex) {
  ScopedSegmentName name("mutex");
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  const uint32_t total = 40 + rng() % 60;
  const uint32_t existing = 1 + rng() % 5;
  const uint32_t append = 4 + rng() % 10;
  const uint32_t die_at = 1 + rng() % (append - 1);
  auto parent = KvStore::Open(Options(name.str(), total, 256));
  ASSERT_TRUE(parent.ok());
  ASSERT_TRUE(AllocateAndFill(parent->get(), 1, 4, seed));
  Child child([&](Child& c) {
    KvStoreOptions o = Options(name.str(), total, 256, OpenMode::kAttach);
    bool armed = false;  // die in the append to an existing sequence, not in its creation
    o.apply_hook_for_testing = [&c, &armed, die_at](uint32_t step) {
      if (armed && step == die_at) {
        c.Signal('m');  // holding the mutex now, mid-mutation
        for (;;) ::pause();
      }
    };
    auto s = KvStore::Open(o);
    if (!s.ok()) return 1;
    if (!(*s)->Allocate(7, existing).ok()) return 3;
    armed = true;
    (*s)->Allocate(7, append).IgnoreError();
    return 2;
  });
  ASSERT_EQ(child.AwaitChild(), 'm');
  child.Kill();
  child.Wait();
  // The parent's own handle is the next locker: it repairs and reclaims the dead child.
  auto stats = (*parent)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->lock_recoveries, 1u);
  EXPECT_EQ(stats->reclaimed_owners, 1u);
  EXPECT_EQ(stats->reclaimed_sequences, 1u);
  EXPECT_EQ(stats->reclaimed_blocks, existing + die_at);  // die_at blocks had left the free list
  EXPECT_EQ(stats->repaired_sequences, 0u);               // its owner is dead: a reclaim
  ASSERT_TRUE((*parent)->CheckConsistency().ok()) << (*parent)->CheckConsistency();
  auto restarted = KvStore::Open(Options(name.str(), total, 256));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  EXPECT_EQ((*restarted)->attach_reclaim().blocks, 0u);  // nothing left to take
  stats = (*restarted)->Stats();
  EXPECT_EQ(stats->used_blocks, 4u);
  EXPECT_EQ(stats->free_blocks, total - 4u);
  EXPECT_TRUE(CheckFill(restarted->get(), 1, seed));  // the live owner's data is untouched
  EXPECT_TRUE((*restarted)->CheckConsistency().ok());
  // And the segment keeps working for everyone.
  EXPECT_TRUE((*restarted)->Allocate(2, total - 4).ok());
  EXPECT_TRUE((*restarted)->CheckConsistency().ok());
}

}  // namespace
}  // namespace specontext::kvstore
