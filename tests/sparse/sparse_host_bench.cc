// Host-side cost of one sparse decode step's set bookkeeping (issue 4): SyntheticOverlap::Apply,
// PlanElasticLoads, FullReloadCopies and ApplyElasticPlan, as SparseDecoder::Decode runs them, at
// R sequences × 8 KV heads × B = 2048 over S = 34K past tokens, for a given synthetic overlap.
// Each iteration is one steady-state step (the previous iteration's sets are the previous step's), so
// the figures include whatever the functions allocate; per-phase means are counters (µs). (The
// decoder no longer copies the sets for last_sets() but swaps them: a copy cost 2 µs per step at one
// sequence, 200-300 µs at 32.)
//   build-sparse/bin/sparse_host_bench [--benchmark_filter=...] [--benchmark_min_time=0.5]
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#include "core/sparse/elastic.h"
#include "core/sparse/synthetic_overlap.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

constexpr int32_t kKvHeads = 8, kBudget = 2048, kLen = 34 * 1024, kSink = 4;

double Since(std::chrono::steady_clock::time_point& t) {
  const auto now = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(now - t).count();
  t = now;
  return s;
}

// args: sequences, overlap in percent.
void BM_HostStep(benchmark::State& state) {
  const int32_t n_seqs = static_cast<int32_t>(state.range(0));
  const double overlap = static_cast<double>(state.range(1)) / 100.0;
  std::mt19937 rng(1234);
  std::vector<int32_t> lens(n_seqs, kLen);
  IndexSets sets = testing_sparse::RandomSets(rng, lens, kKvHeads, kKvHeads, kBudget, kBudget);
  SyntheticOverlap synthetic(overlap);
  std::vector<PreviousSets> prev(n_seqs);
  std::vector<PreviousSets*> prev_ptrs;
  for (PreviousSets& p : prev) prev_ptrs.push_back(&p);
  std::vector<SlotMap> maps(n_seqs, SlotMap(kKvHeads, kBudget));
  std::vector<SlotMap*> map_ptrs;
  for (SlotMap& m : maps) map_ptrs.push_back(&m);
  std::vector<const SlotMap*> cmaps(map_ptrs.begin(), map_ptrs.end());
  // Warm up: record the first sets and fill the maps (the decoder's first offloaded step).
  for (int i = 0; i < 2; ++i) {
    if (!synthetic.Apply(kSink, prev_ptrs, &sets).ok()) state.SkipWithError("synthetic overlap failed");
    absl::StatusOr<ElasticPlan> plan = PlanElasticLoads(cmaps, sets);
    if (!plan.ok() || !ApplyElasticPlan(*plan, sets, map_ptrs).ok()) state.SkipWithError("elastic failed");
  }
  double t_syn = 0, t_plan = 0, t_full = 0, t_apply = 0;
  int64_t kept = 0, rows = 0;
  ElasticPlan plan;  // reused across steps, as the decoder does
  CopyList full;
  for (auto _ : state) {
    auto t = std::chrono::steady_clock::now();
    absl::Status st = synthetic.Apply(kSink, prev_ptrs, &sets);
    t_syn += Since(t);
    st.Update(PlanElasticLoads(cmaps, sets, &plan));
    t_plan += Since(t);
    FullReloadCopies(sets, plan.slots, &full);
    benchmark::DoNotOptimize(full.copies.data());
    t_full += Since(t);
    st.Update(ApplyElasticPlan(plan, sets, map_ptrs));
    t_apply += Since(t);
    if (!st.ok()) state.SkipWithError(std::string(st.message()).c_str());
    kept += plan.kept_rows;
    rows += plan.set_rows;
  }
  using C = benchmark::Counter;
  state.counters["synthetic_us"] = C(t_syn * 1e6, C::kAvgIterations);
  state.counters["plan_us"] = C(t_plan * 1e6, C::kAvgIterations);
  state.counters["full_reload_us"] = C(t_full * 1e6, C::kAvgIterations);
  state.counters["apply_us"] = C(t_apply * 1e6, C::kAvgIterations);
  state.counters["overlap"] = rows > 0 ? static_cast<double>(kept) / rows : 0;
}

BENCHMARK(BM_HostStep)
    ->ArgNames({"seqs", "overlap_pct"})
    ->Args({1, 10})
    ->Args({1, 85})
    ->Args({32, 10})
    ->Args({32, 85})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace specontext

BENCHMARK_MAIN();
