// A small persistent thread pool for the CPU backend's loops and the sparse decoder's host work.
// Workers sleep on a condition variable between calls after at most 50 us of yielding, so the pool
// behaves on oversubscribed machines (CI, services sharing cores) where OpenMP's spin-waiting did not,
// while back-to-back calls (a decode step's planning) find them awake.
#pragma once

#include <cstdint>
#include <functional>

namespace specontext {

// Sets the number of threads used by ParallelFor (0 = DefaultCpuThreads(): the CPUs this process may
// use). Call before use.
void SetCpuThreads(int threads);
int CpuThreads();

// Runs fn(begin, end) over [0, n) split into contiguous ranges (about four per thread, claimed by
// whichever thread is free: a late-waking worker takes fewer); the caller takes part. Which ranges a call
// gets is not fixed. Runs inline when n * cost_per_item is below ~50k "operations" or the pool has one thread.
void ParallelFor(int64_t n, int64_t cost_per_item, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace specontext
