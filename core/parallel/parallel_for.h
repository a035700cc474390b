// A small persistent thread pool for the CPU backend's loops and the sparse decoder's host work.
// Workers sleep on a condition variable between calls after at most 50 us of yielding, so the pool
// behaves on oversubscribed machines (CI, services sharing cores) where OpenMP's spin-waiting did
// not, while back-to-back calls (a decode step's planning) find them awake. The caller never waits
// for a worker to be scheduled: it runs the ranges nobody has claimed, and sleeps (after 20 us)
// only for ranges a worker is already running.
#pragma once

#include <cstdint>
#include <functional>

namespace specontext {

// Sets the number of threads used by ParallelFor (0 = DefaultCpuThreads(): the CPUs this process
// may use). Call before use.
void SetCpuThreads(int threads);
int CpuThreads();

// Runs fn(begin, end) over [0, n) split into contiguous ranges (about four per thread, each worth
// at least ~65k "operations" of n * cost_per_item) claimed by whichever thread is free: the caller
// takes part, a late-waking worker takes fewer and a descheduled one none. fn must compute the same
// for an index whichever range and thread it runs in; how [0, n) is split is not part of the
// contract. Runs inline when the work is less than two ranges' worth or the pool has one thread.
void ParallelFor(int64_t n, int64_t cost_per_item, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace specontext
