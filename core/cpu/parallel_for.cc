#include "core/cpu/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace specontext {
namespace {

class Pool {
 public:
  explicit Pool(int threads) : n_threads_(std::max(1, threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { Work(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return n_threads_; }

  void Run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> run_lock(run_mu_);  // one parallel call at a time
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      pending_ = n_threads_ - 1;
      ++generation_;
    }
    cv_.notify_all();
    Slice(0, n, fn);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Slice(int index, int64_t n, const std::function<void(int64_t, int64_t)>& fn) const {
    const int64_t chunk = (n + n_threads_ - 1) / n_threads_;
    const int64_t begin = std::min(n, index * chunk), end = std::min(n, begin + chunk);
    if (begin < end) fn(begin, end);
  }

  void Work(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t, int64_t)>* fn;
      int64_t n;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        fn = fn_;
        n = n_;
      }
      Slice(index, n, *fn);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int pending_ = 0;
};

std::atomic<int> g_threads{0};
std::once_flag g_once;
std::unique_ptr<Pool> g_pool;

Pool& GetPool() {
  std::call_once(g_once, [] {
    int t = g_threads.load();
    if (t <= 0) t = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
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
