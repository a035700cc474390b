// Block allocator and sequence tables in one process: all-or-nothing allocation, a random-operation
// property test against a simple model, ownership rules, threads.
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kvstore/test_util.h"

namespace specontext::kvstore {
namespace {

using ::specontext::kvstore::testing::FreshSeed;
using ::specontext::kvstore::testing::Options;
using ::specontext::kvstore::testing::ScopedSegmentName;
using ::testing::HasSubstr;

std::unique_ptr<KvStore> OpenOrDie(const KvStoreOptions& o) {
  auto s = KvStore::Open(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

TEST(AllocatorTest, FailedAllocateChangesNothing) {
  ScopedSegmentName name("aon");
  std::mt19937_64 rng(FreshSeed());
  const uint32_t total = 10 + rng() % 50;
  auto store = OpenOrDie(Options(name.str(), total, 64));
  ASSERT_NE(store, nullptr);
  const uint32_t first = 1 + rng() % (total - 2);
  ASSERT_TRUE(store->Allocate(1, first).ok());
  auto before = store->GetSequence(1);
  ASSERT_TRUE(before.ok());
  // Too many for an existing sequence and for a new one: both refused, nothing moves.
  absl::Status st = store->Allocate(1, total - first + 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("free"));
  EXPECT_EQ(store->Allocate(2, total - first + 1 + rng() % 5).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store->GetSequence(2).status().code(), absl::StatusCode::kNotFound);
  auto after = store->GetSequence(1);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->blocks, before->blocks);
  auto stats = store->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->free_blocks, total - first);
  EXPECT_EQ(stats->sequences, 1u);
  // Exactly the rest fits.
  EXPECT_TRUE(store->Allocate(2, total - first).ok());
  EXPECT_EQ(store->Stats()->free_blocks, 0u);
  EXPECT_TRUE(store->CheckConsistency().ok());
}

TEST(AllocatorTest, SequenceSlotsRunOut) {
  ScopedSegmentName name("slots");
  KvStoreOptions o = Options(name.str(), 32, 64);
  o.geometry->max_sequences = 3;
  auto store = OpenOrDie(o);
  ASSERT_NE(store, nullptr);
  for (uint64_t id = 10; id < 13; ++id) ASSERT_TRUE(store->Allocate(id, 2).ok());
  EXPECT_EQ(store->Allocate(13, 1).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store->Stats()->free_blocks, 26u);
  ASSERT_TRUE(store->FreeSequence(11).ok());
  EXPECT_TRUE(store->Allocate(13, 1).ok());
  EXPECT_TRUE(store->CheckConsistency().ok());
}

// Random allocate / free-tail / free-sequence / token updates against a model map. Each block also
// carries a random signature written through its host address, checked at the end.
TEST(AllocatorTest, RandomOperationsMatchModel) {
  ScopedSegmentName name("prop");
  std::mt19937_64 rng(FreshSeed());
  const uint32_t total = 97 + rng() % 64;
  const uint64_t bytes = 64 * (1 + rng() % 4);
  KvStoreOptions o = Options(name.str(), total, bytes);
  o.geometry->max_sequences = 12;
  auto store = OpenOrDie(o);
  ASSERT_NE(store, nullptr);
  std::map<uint64_t, std::vector<uint32_t>> model;
  std::map<uint64_t, uint64_t> tokens;
  std::map<uint32_t, uint64_t> signature;  // block -> value written into its first 8 bytes
  auto used = [&] {
    size_t n = 0;
    for (auto& [id, b] : model) n += b.size();
    return n;
  };
  for (int step = 0; step < 3000; ++step) {
    SCOPED_TRACE(step);
    const uint64_t id = 1000 + rng() % 16;
    const int op = static_cast<int>(rng() % 10);
    const bool exists = model.count(id) > 0;
    if (op < 5) {
      const uint32_t n = static_cast<uint32_t>(rng() % 12);
      const bool fits = n <= total - used() && (exists || model.size() < 12);
      absl::Status st = store->Allocate(id, n);
      ASSERT_EQ(st.ok(), fits) << st;
      if (fits) {
        auto info = store->GetSequence(id);
        ASSERT_TRUE(info.ok());
        std::vector<uint32_t>& m = model[id];
        ASSERT_EQ(info->blocks.size(), m.size() + n);
        ASSERT_TRUE(std::equal(m.begin(), m.end(), info->blocks.begin()));  // append only
        for (size_t i = m.size(); i < info->blocks.size(); ++i) {
          const uint32_t b = info->blocks[i];
          ASSERT_EQ(signature.count(b), 0u) << "block " << b << " handed out twice";
          const uint64_t sig = rng();
          std::memcpy(*store->BlockData(b), &sig, sizeof(sig));
          signature[b] = sig;
        }
        m = info->blocks;
      } else {
        ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
      }
    } else if (op < 7) {
      const uint32_t n = exists ? static_cast<uint32_t>(rng() % (model[id].size() + 2)) : 1;
      absl::Status st = store->FreeTail(id, n);
      if (!exists) {
        ASSERT_EQ(st.code(), absl::StatusCode::kNotFound);
      } else if (n > model[id].size()) {
        ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
      } else {
        ASSERT_TRUE(st.ok()) << st;
        for (uint32_t i = 0; i < n; ++i) {
          signature.erase(model[id].back());
          model[id].pop_back();
        }
      }
    } else if (op < 9) {
      absl::Status st = store->FreeSequence(id);
      ASSERT_EQ(st.ok(), exists) << st;
      if (exists) {
        for (uint32_t b : model[id]) signature.erase(b);
        model.erase(id);
        tokens.erase(id);
      }
    } else {
      const uint64_t t = rng() % 100000;
      ASSERT_EQ(store->SetTokenCount(id, t).ok(), exists);
      if (exists) tokens[id] = t;
    }
    auto stats = store->Stats();
    ASSERT_TRUE(stats.ok());
    ASSERT_EQ(stats->free_blocks, total - used());
    ASSERT_EQ(stats->sequences, model.size());
    if (step % 97 == 0) {
      ASSERT_TRUE(store->CheckConsistency().ok());
    }
  }
  ASSERT_TRUE(store->CheckConsistency().ok());
  for (auto& [id, blocks] : model) {
    auto info = store->GetSequence(id);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->blocks, blocks);
    EXPECT_EQ(info->token_count, tokens.count(id) ? tokens[id] : 0u);
  }
  for (auto& [b, sig] : signature) {
    uint64_t got;
    std::memcpy(&got, *store->BlockData(b), sizeof(got));
    ASSERT_EQ(got, sig) << "block " << b;
  }
}

TEST(AllocatorTest, OwnershipRules) {
  ScopedSegmentName name("owners");
  auto a = OpenOrDie(Options(name.str(), 40, 64));
  auto b = OpenOrDie(Options(name.str(), 40, 64));
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->Allocate(5, 7).ok());
  EXPECT_EQ(b->Allocate(5, 1).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(b->FreeSequence(5).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(b->FreeTail(5, 1).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(b->SetTokenCount(5, 1).code(), absl::StatusCode::kPermissionDenied);
  auto seen = b->GetSequence(5);  // reading is allowed
  ASSERT_TRUE(seen.ok());
  EXPECT_EQ(seen->blocks.size(), 7u);
  EXPECT_EQ(seen->owner_slot, static_cast<uint32_t>(a->owner_slot()));
  ASSERT_TRUE(b->Allocate(6, 3).ok());
  EXPECT_EQ(b->Stats()->owners, 2u);
  // Closing an owner frees what it held, and only that.
  ASSERT_TRUE(a->Close().ok());
  auto stats = b->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->free_blocks, 37u);
  EXPECT_EQ(stats->owners, 1u);
  EXPECT_EQ(stats->reclaimed_blocks, 0u);  // a clean close is not a reclaim
  EXPECT_EQ(a->Allocate(9, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(b->CheckConsistency().ok());
}

TEST(AllocatorTest, ObserverCannotMutate) {
  ScopedSegmentName name("observer");
  auto a = OpenOrDie(Options(name.str(), 8, 64));
  KvStoreOptions o = Options(name.str(), 8, 64, OpenMode::kAttach);
  o.register_owner = false;
  auto obs = OpenOrDie(o);
  ASSERT_TRUE(a && obs);
  EXPECT_EQ(obs->owner_slot(), -1);
  EXPECT_EQ(obs->Allocate(1, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(obs->Heartbeat().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(obs->Stats()->owners, 1u);
}

TEST(AllocatorTest, ThreadsOnTwoHandlesKeepInvariants) {
  ScopedSegmentName name("threads");
  const uint32_t total = 257;
  auto a = OpenOrDie(Options(name.str(), total, 64));
  auto b = OpenOrDie(Options(name.str(), total, 64));
  ASSERT_TRUE(a && b);
  const uint64_t seed = FreshSeed();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    KvStore* s = (t % 2 == 0) ? a.get() : b.get();
    threads.emplace_back([s, t, seed] {
      std::mt19937_64 rng(seed + t);
      for (int i = 0; i < 400; ++i) {
        const uint64_t id = 100 * (t + 1) + rng() % 4;
        if (rng() % 3 == 0) {
          (void)s->FreeSequence(id);
        } else {
          (void)s->Allocate(id, static_cast<uint32_t>(rng() % 9));
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_TRUE(a->CheckConsistency().ok()) << a->CheckConsistency();
  auto snap = a->Inspect();
  ASSERT_TRUE(snap.ok());
  uint64_t listed = 0;
  for (const auto& s : snap->sequences) listed += s.blocks.size();
  EXPECT_EQ(listed + snap->stats.free_blocks, total);
}

}  // namespace
}  // namespace specontext::kvstore
