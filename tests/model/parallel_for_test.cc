// ParallelFor (core/cpu/parallel_for.h): every index runs exactly once in contiguous non-overlapping
// ranges, whatever the sizes, across many back-to-back calls (workers waking late, spinning, sleeping),
// with calls from several threads at once, and small calls run inline on the caller.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "core/cpu/parallel_for.h"

namespace specontext {
namespace {

void ExpectEachIndexOnce(int64_t n, int64_t cost) {
  std::vector<std::atomic<int>> hits(n);
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  ParallelFor(n, cost, [&](int64_t begin, int64_t end) {
    ASSERT_LT(begin, end);
    for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
    std::lock_guard<std::mutex> lock(mu);
    ranges.emplace_back(begin, end);
  });
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i << " of " << n;
  std::sort(ranges.begin(), ranges.end());
  ASSERT_FALSE(ranges.empty());
  EXPECT_EQ(ranges.front().first, 0);
  EXPECT_EQ(ranges.back().second, n);
  for (size_t r = 1; r < ranges.size(); ++r) EXPECT_EQ(ranges[r].first, ranges[r - 1].second);
}

TEST(ParallelFor, EveryIndexOnceInContiguousRanges) {
  std::mt19937 rng(std::random_device{}());
  for (int call = 0; call < 300; ++call) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 5000);
    ExpectEachIndexOnce(n, 1000);  // large enough to go parallel
    if (call % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // workers go to sleep
  }
  ExpectEachIndexOnce(1, 1 << 20);
  ExpectEachIndexOnce(7, 1);  // below the threshold: inline
}

TEST(ParallelFor, SmallCallsRunInlineOnTheCaller) {
  const std::thread::id me = std::this_thread::get_id();
  bool inline_only = true;
  ParallelFor(10, 10, [&](int64_t, int64_t) { inline_only = inline_only && std::this_thread::get_id() == me; });
  EXPECT_TRUE(inline_only);
  int calls = 0;
  ParallelFor(0, 1 << 20, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ParallelFor, CallsFromSeveralThreadsAtOnce) {
  std::vector<std::thread> callers;
  std::atomic<int64_t> total{0};
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&total, t] {
      for (int call = 0; call < 50; ++call) {
        const int64_t n = 100 + 37 * t + call;
        std::atomic<int64_t> sum{0};
        ParallelFor(n, 1000, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) sum.fetch_add(i);
        });
        ASSERT_EQ(sum.load(), n * (n - 1) / 2);
        total.fetch_add(1);
      }
    });
  }
  for (auto& c : callers) c.join();
  EXPECT_EQ(total.load(), 200);
}

// A pool made and destroyed at once (its workers may start after the stop): the process still exits.
TEST(ParallelForDeathTest, ExitRightAfterThePoolIsMade) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process: the pool is made in the child
  for (int i = 0; i < 10; ++i) {
    EXPECT_EXIT(
        {
          SetCpuThreads(8);
          if (CpuThreads() != 8) std::exit(3);
          std::exit(0);
        },
        ::testing::ExitedWithCode(0), "");
  }
}

}  // namespace
}  // namespace specontext
