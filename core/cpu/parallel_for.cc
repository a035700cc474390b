#include "core/cpu/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/cpu/cpu_limits.h"

namespace specontext {
namespace {

// One ParallelFor call: ranges of `grain` items are claimed from `next` by whoever gets there first (the
// caller and the workers as they wake), so a worker that wakes late takes less instead of holding the call
// up; the call is over when `done` items have run. Workers keep the job alive (shared_ptr) while they look
// at it, and only call fn for a range they claimed, which the caller waits for.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0;
  int64_t grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (;;) {
      const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
      if (begin >= n) return;
      const int64_t end = std::min(n, begin + grain);
      (*fn)(begin, end);
      done.fetch_add(end - begin, std::memory_order_release);
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

  void Run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> run_lock(run_mu_);  // one parallel call at a time
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    // About four ranges per thread: small enough to balance late wake-ups, large enough to amortise claims.
    job->grain = std::max<int64_t>(1, n / (4 * int64_t{n_threads_}));
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Drain();
    // Every range is claimed; wait for the ones workers are still running (at most a grain each).
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
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
  if (pool.threads() == 1 || n == 1 || n * std::max<int64_t>(1, cost_per_item) < 50000) {
    fn(0, n);
    return;
  }
  pool.Run(n, fn);
}

}  // namespace specontext
