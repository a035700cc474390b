#include "core/parallel/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/parallel/cpu_limits.h"

namespace specontext {
namespace {

// Below this many cost units ("operations") a range is not worth a worker's wake-up: a futex wake
// and a context switch take tens of microseconds on a loaded host, and far longer when the worker
// has to wait for a CPU. A call splits only into ranges at least this large.
constexpr int64_t kMinRangeCost = int64_t{1} << 16;

// How long the caller spins for workers still running a claimed range before it sleeps: long enough
// for a range that is nearly done, short enough that a descheduled worker costs no CPU to wait for.
constexpr auto kCallerSpin = std::chrono::microseconds(20);

// One ParallelFor call: ranges of `grain` items are claimed from `next` by whoever gets there first
// (the caller and the workers as they wake), so a worker that wakes late takes less instead of
// holding the call up, and one that never wakes takes nothing; the call is over when `done` items
// have run. Workers keep the job alive (shared_ptr) while they look at it, and only call fn for a
// range they claimed, which the caller waits for. Every index is in exactly one range, and which
// thread runs it does not change what the range computes.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0;
  int64_t grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> finished{0};  // set, with a wake-up, by whoever completes the last range

  void Drain() {
    for (;;) {
      const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
      if (begin >= n) return;
      const int64_t end = std::min(n, begin + grain);
      (*fn)(begin, end);
      if (done.fetch_add(end - begin, std::memory_order_acq_rel) + (end - begin) == n) {
        finished.store(1, std::memory_order_release);
        finished.notify_one();
      }
    }
  }

  // The caller, once no range is left to claim: a short spin, then sleep until the last range is
  // done. It never yields in a loop: on a busy host a yield hands the CPU to another process rather
  // than to the descheduled worker it waits for, and the spin would last as long as that worker is
  // off a CPU.
  void WaitForClaimedRanges() {
    const auto spin_until = std::chrono::steady_clock::now() + kCallerSpin;
    while (finished.load(std::memory_order_acquire) == 0) {
      if (std::chrono::steady_clock::now() >= spin_until) {
        finished.wait(0, std::memory_order_acquire);
      }
    }
  }
};

class Pool {
 public:
  explicit Pool(int threads) : n_threads_(std::max(1, threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return n_threads_; }

  void Run(int64_t n, int64_t ranges, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> run_lock(run_mu_);  // one parallel call at a time
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    job->grain = (n + ranges - 1) / ranges;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Drain();
    // Every range is claimed; wait for the ones workers are still running (at most a grain each).
    job->WaitForClaimedRanges();
    std::lock_guard<std::mutex> lock(mu_);
    job_.reset();
  }

 private:
  void Work() {
    uint64_t seen = 0;  // the generation at construction, not at thread start: a call or the stop may come first
    for (;;) {
      // A short bounded wait for the next call before sleeping: a decode step makes several parallel calls
      // within a millisecond, and a futex wake-up of every worker costs more than that on a busy host.
      // Yielding keeps it harmless on oversubscribed machines.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        if (stop_) return;
        job = job_;
      }
      if (job != nullptr) job->Drain();
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  std::shared_ptr<Job> job_;  // the call in progress (null between calls)
};

std::atomic<int> g_threads{0};
std::once_flag g_once;
std::unique_ptr<Pool> g_pool;

Pool& GetPool() {
  std::call_once(g_once, [] {
    int t = g_threads.load();
    if (t <= 0) t = DefaultCpuThreads();
    g_pool = std::make_unique<Pool>(t);
  });
  return *g_pool;
}

}  // namespace

void SetCpuThreads(int threads) { g_threads.store(threads); }
int CpuThreads() { return GetPool().threads(); }

void ParallelFor(int64_t n, int64_t cost_per_item, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Pool& pool = GetPool();
  // About four ranges per thread, to balance late wake-ups, but none below kMinRangeCost.
  const int64_t cost = std::max<int64_t>(1, cost_per_item);
  const int64_t worth =
      n > std::numeric_limits<int64_t>::max() / cost ? n : n * cost / kMinRangeCost;
  const int64_t ranges = std::min({n, 4 * int64_t{pool.threads()}, std::max<int64_t>(1, worth)});
  if (pool.threads() == 1 || ranges < 2) {
    fn(0, n);
    return;
  }
  pool.Run(n, ranges, fn);
}

}  // namespace specontext
