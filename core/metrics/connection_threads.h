// ConnectionThreads: a cpp-httplib task queue giving every connection a thread of its own (shared by
// the /metrics server and the generator's OpenAI-compatible HTTP front end).
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "httplib.h"

namespace specontext::metrics {

// cpp-httplib serves each accepted connection as one job of its task queue, and a job holds its
// thread while the connection is open (idle or mid-request). A fixed pool of a few threads is
// therefore blocked by a few slow or idle clients; this queue gives every connection a thread of
// its own, started on demand, up to `max_threads`. Past that, jobs wait in FIFO order. A thread
// with no job for kRetireAfter exits.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(int max_threads) : max_threads_(std::max(1, max_threads)) {}
  ~ConnectionThreads() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::lock_guard<std::mutex> lock(mu_);
    JoinRetired();
    jobs_.push_back(std::move(fn));
    if (jobs_.size() <= static_cast<size_t>(idle_)) {
      cv_.notify_one();
    } else if (static_cast<int>(threads_.size()) < max_threads_) {
      std::thread t([this] { Work(); });
      const std::thread::id id = t.get_id();
      threads_.emplace(id, std::move(t));
    }
  }

  // Finishes the queued jobs (the server's listening socket is closed by now, so they return at
  // once) and joins every thread. Idempotent.
  void shutdown() override {
    std::map<std::thread::id, std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_ = true;
      threads.swap(threads_);
      for (std::thread& t : retired_) threads.emplace(t.get_id(), std::move(t));
      retired_.clear();
    }
    cv_.notify_all();
    for (auto& [id, t] : threads) t.join();
  }

 private:
  static constexpr std::chrono::seconds kRetireAfter{10};

  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait_for(lock, kRetireAfter, [this] { return shutdown_ || !jobs_.empty(); });
      --idle_;
      if (jobs_.empty()) break;  // shut down, or idle for kRetireAfter
      std::function<void()> fn = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
    // Hand this thread's handle to the next enqueue() (or shutdown()) to join.
    if (auto it = threads_.find(std::this_thread::get_id()); it != threads_.end()) {
      retired_.push_back(std::move(it->second));
      threads_.erase(it);
    }
  }

  void JoinRetired() {
    for (std::thread& t : retired_) t.join();  // each has left Work(): only returning is left
    retired_.clear();
  }

  const int max_threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::map<std::thread::id, std::thread> threads_;
  std::vector<std::thread> retired_;
  int idle_ = 0;
  bool shutdown_ = false;
};

}  // namespace specontext::metrics
