// ParallelFor (core/parallel/parallel_for.h): every index runs exactly once in contiguous
// non-overlapping ranges, whatever the sizes, across many back-to-back calls (workers waking late,
// spinning, sleeping), with calls from several threads at once; small calls run inline on the
// caller; no range is smaller than a wake-up is worth; the caller takes over ranges no worker has
// started, and sleeps rather than spins while a worker it waits for is off its CPU.
#include "core/parallel/parallel_for.h"

#include <gtest/gtest.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

namespace specontext {
namespace {

// Several workers whatever the machine, so that the tests below have workers to wait for.
class FourThreads : public ::testing::Environment {
 public:
  void SetUp() override { SetCpuThreads(4); }
};
const auto* const kFourThreads = ::testing::AddGlobalTestEnvironment(new FourThreads);

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

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

// Work just above the old inline threshold (50k) but below two ranges' worth of a wake-up runs as
// one range on the caller: splitting it cost more in wake-ups than it saved.
TEST(ParallelFor, WorkBelowTwoWakeUpsRunsAsOneRange) {
  ASSERT_EQ(CpuThreads(), 4);
  const std::thread::id me = std::this_thread::get_id();
  std::vector<std::pair<int64_t, int64_t>> ranges;
  bool on_caller = true;
  ParallelFor(100, 1000, [&](int64_t begin, int64_t end) {
    ranges.emplace_back(begin, end);  // one range: no lock needed
    on_caller = on_caller && std::this_thread::get_id() == me;
  });
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0], std::make_pair(int64_t{0}, int64_t{100}));
  EXPECT_TRUE(on_caller);
}

// Ranges are never smaller than a wake-up is worth (~65k cost units), however many threads there
// are.
TEST(ParallelFor, RangesAreWorthAWakeUp) {
  for (const int64_t cost : {1000, 5000, 40000}) {
    std::mutex mu;
    std::vector<std::pair<int64_t, int64_t>> ranges;
    ParallelFor(1000, cost, [&](int64_t begin, int64_t end) {
      std::lock_guard<std::mutex> lock(mu);
      ranges.emplace_back(begin, end);
    });
    std::sort(ranges.begin(), ranges.end());
    ASSERT_GE(ranges.size(), 2u) << "cost " << cost;
    ranges.pop_back();  // the last range takes the remainder
    for (const auto& [begin, end] : ranges)
      EXPECT_GE((end - begin) * cost, int64_t{1} << 16) << "cost " << cost;
  }
}

// A worker stuck in its range (as if descheduled) holds up only that range: every other range is
// finished (by the caller or other workers) before the stuck one ends, and the caller waits for it
// asleep, not spinning on its CPU.
TEST(ParallelFor, CallerTakesOverAndSleepsWhileAWorkerIsStuck) {
  const std::thread::id me = std::this_thread::get_id();
  constexpr int64_t kN = 64;
  std::atomic<int64_t> on_caller{0}, done{0}, stuck_range{0}, done_when_unstuck{-1};
  std::atomic<bool> worker_stuck{false};
  std::mutex mu;
  std::condition_variable cv;
  double caller_cpu_s = -1;
  const auto start = std::chrono::steady_clock::now();
  for (int attempt = 0; attempt < 50 && !worker_stuck.load(); ++attempt) {
    on_caller = 0;
    done = 0;
    const double cpu0 = ThreadCpuSeconds();
    ParallelFor(kN, 1 << 20, [&](int64_t begin, int64_t end) {
      if (std::this_thread::get_id() == me) {
        on_caller.fetch_add(end - begin);
        // Leave a worker time to wake and claim a range before the caller takes everything.
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(5), [&] { return worker_stuck.load(); });
        done.fetch_add(end - begin);
        return;
      }
      bool expected = false;
      if (!worker_stuck.compare_exchange_strong(expected, true)) {
        done.fetch_add(end - begin);
        return;
      }
      stuck_range = end - begin;
      cv.notify_all();
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      done_when_unstuck = done.load();
    });
    caller_cpu_s = ThreadCpuSeconds() - cpu0;
  }
  ASSERT_TRUE(worker_stuck.load()) << "no worker ever claimed a range";
  EXPECT_GT(on_caller.load(), 0);
  // Every range but the stuck one was run while it slept (300 ms is far beyond 63 tiny ranges).
  EXPECT_EQ(done_when_unstuck.load(), kN - stuck_range.load());
  // Spinning or yielding through the 300 ms costs ~300 ms of CPU; sleeping costs next to nothing.
  EXPECT_LT(caller_cpu_s, 0.1) << "the caller burned its CPU waiting for the stuck worker";
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

// Each index's result depends only on the index, not on the range or the thread that computed it: a
// parallel call's output is bit-identical to running the whole loop on one thread.
TEST(ParallelFor, ResultsMatchTheSerialLoop) {
  constexpr int64_t kN = 20000;
  const auto value = [](int64_t i) {
    float acc = 0;
    for (int j = 1; j <= 64; ++j)
      acc += std::sin(static_cast<float>(i * j)) / static_cast<float>(j);
    return acc;
  };
  std::vector<float> serial(kN), parallel(kN);
  for (int64_t i = 0; i < kN; ++i) serial[i] = value(i);
  for (int call = 0; call < 20; ++call) {
    ParallelFor(kN, 200, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) parallel[i] = value(i);
    });
    ASSERT_EQ(std::memcmp(serial.data(), parallel.data(), kN * sizeof(float)), 0)
        << "call " << call;
  }
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
