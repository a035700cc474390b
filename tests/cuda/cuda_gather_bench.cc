// Elastic-loading benchmark (SpeContext, DESIGN.md §1 part 2): host->GPU gather bandwidth of ElasticLoad for
// 256- and 512-byte rows (head_dim 128 / 256, bf16) at budget 2048 x 8 KV heads x 32 offloaded layers, one
// sequence, against a pinned bulk copy of the same bytes; then elastic vs full reload (bytes and time) at
// index-set overlaps 0.5-0.95. Time is wall time of the 32 ElasticLoad calls until the copy stream is idle
// (launch overhead included), best of --reps. Then the decode kernels against their floors
// (cuda_decode_bench.inc): sparse attention over a shape sweep, selection at R in {1, 8, 32}, S in {8K, 32K}.
// --alloc runs the elastic section once per host tier (cuda_gather_host_tier.inc): pinned (AllocPinnedHost,
// the default), the HostPinMode kinds, vmmhost, and kvstore (a /dev/shm kvstore segment registered as the
// generator's --kvstore registers it).
// --section footprint (not part of "all": it pins tens of GiB) is the decode benchmark's host tier at full
// size, per host allocation mode (cuda_gather_footprint.inc has its flags).
//
//   cuda_gather_bench [--capacity 16384] [--reps 5] [--section all|elastic|attn|select|footprint]
//                     [--alloc pinned,hostalloc,register4k,thp,hugetlb,vmmhost,kvstore]
//   cuda_gather_bench --section footprint --footprint-gib 80 --sequences 32 --alloc hostalloc,thp
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/selection.h"
#include "core/sparse/elastic.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace specontext {
namespace {

constexpr int kKv = 8, kLayers = 32, kBudget = 2048;

#define CHECK_OK(expr)                                                              \
  do {                                                                              \
    absl::Status s_ = (expr);                                                       \
    if (!s_.ok()) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

IndexSets Sets(int len, std::mt19937& rng, const IndexSets* prev, double keep) {
  IndexSets s;
  s.Reset(1, kKv, kKv, kBudget);
  s.seq_len[0] = len;
  for (int h = 0; h < kKv; ++h) {
    std::vector<int32_t> out;
    std::vector<char> used(len, 0);
    if (prev != nullptr) {
      auto p = prev->SetPositions(h);
      const int n_keep = static_cast<int>(keep * p.size());
      std::vector<int32_t> v(p.begin(), p.end());
      std::shuffle(v.begin(), v.end(), rng);
      for (int i = 0; i < n_keep; ++i) {
        out.push_back(v[i]);
        used[v[i]] = 1;
      }
    }
    while (static_cast<int>(out.size()) < kBudget) {
      const int32_t t = static_cast<int32_t>(rng() % len);
      if (!used[t]) {
        used[t] = 1;
        out.push_back(t);
      }
    }
    std::sort(out.begin(), out.end());
    s.indices.insert(s.indices.end(), out.begin(), out.end());
    s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
  }
  return s;
}

// Best wall time of `reps` rounds of ElasticLoad over all layers.
double TimeLoads(cuda::CudaBackend& b, const CopyList& cl, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps + 1; ++r) {  // the first round uploads the list and warms up
    CHECK_OK(b.SyncCopyStream());
    const double t0 = Seconds();
    for (int l = 0; l < kLayers; ++l) CHECK_OK(b.ElasticLoad(l, cl, nullptr));
    CHECK_OK(b.SyncCopyStream());
    if (r > 0) best = std::min(best, Seconds() - t0);
  }
  return best;
}

}  // namespace
}  // namespace specontext

#include "tests/cuda/cuda_gather_footprint.inc"
#include "tests/cuda/cuda_gather_host_tier.inc"

namespace specontext {
namespace {

// The elastic section with the host tensors from `mode` (cuda_gather_host_tier.inc).
void Run(int hd, int capacity, int reps, const std::string& mode) {
  auto made = MakeCudaBackend({});
  CHECK_OK(made.status());
  auto* b = dynamic_cast<cuda::CudaBackend*>(made->get());
  const int64_t row_bytes = int64_t{hd} * 2;
  const int64_t tensor_bytes = int64_t{kKv} * capacity * row_bytes;
  // Declared before the tensors: the tier (a kvstore segment's views) must outlive them.
  auto tier = host_tier::HostTier::Make(mode, b, 2 * kLayers, tensor_bytes);
  CHECK_OK(tier.status());
  SequenceKv kv;
  kv.capacity = capacity;
  kv.slot_budget = kBudget;
  for (int l = 0; l < kLayers; ++l) {
    for (auto* v : {&kv.host_k, &kv.host_v}) {
      bool cpu_access = true;
      auto t = (*tier)->Alloc({kKv, capacity, hd}, &cpu_access);
      CHECK_OK(t.status());
      if (cpu_access) std::memset(t->data(), l + 1, t->nbytes());
      v->push_back(*t);
    }
    kv.k.push_back(kv.host_k.back());
    kv.v.push_back(kv.host_v.back());
    for (auto* v : {&kv.slot_k, &kv.slot_v}) {
      auto t = b->Alloc(DType::kBF16, {kKv, kBudget, hd}, MemoryKind::kPrefetch);
      CHECK_OK(t.status());
      v->push_back(*t);
    }
  }
  std::printf("host tier %s, row %lld B: %s\n", mode.c_str(), static_cast<long long>(row_bytes),
              (*tier)->Describe().c_str());
  BatchDesc batch;
  batch.seqs = {{0, 1, capacity - 1}};
  batch.kv = {&kv};
  batch.n_tokens = 1;
  CHECK_OK(b->PrepareBatch(batch));
  std::mt19937 rng(12345);
  const int len = capacity - 1;

  // Full reload of S_now.
  SlotMap map(kKv, kBudget);
  IndexSets last = Sets(len, rng, nullptr, 0);
  std::vector<const SlotMap*> cm{&map};
  std::vector<SlotMap*> mm{&map};
  auto plan0 = PlanElasticLoads(cm, last);
  CHECK_OK(plan0.status());
  const CopyList full = FullReloadCopies(last, plan0->slots);
  const double full_bytes = 2.0 * full.head_rows * row_bytes * kLayers;
  const double t_full = TimeLoads(*b, full, reps);
  // Pinned bulk copy of the same byte count (contiguous), for reference.
  const size_t per_layer = static_cast<size_t>(2 * full.head_rows * row_bytes);
  void* dst = nullptr;
  cudaMalloc(&dst, per_layer);
  cudaStream_t st;
  cudaStreamCreate(&st);
  double t_bulk = 1e30;
  for (int r = 0; r < reps + 1; ++r) {
    cudaStreamSynchronize(st);
    const double t0 = Seconds();
    for (int l = 0; l < kLayers; ++l) {
      cudaMemcpyAsync(dst, kv.host_k[l].data(), std::min(per_layer, kv.host_k[l].nbytes()), cudaMemcpyDefault, st);
    }
    cudaStreamSynchronize(st);
    if (r > 0) t_bulk = std::min(t_bulk, Seconds() - t0);
  }
  const double bulk_bytes = double(std::min(per_layer, kv.host_k[0].nbytes())) * kLayers;
  std::printf("%s row %lld B | full reload: %d layers x %d KV heads x %d rows x K+V = %.1f MB in %.3f ms = %.1f GB/s "
              "(gather of mapped rows) | bulk copy from the same memory: %.1f GB/s\n",
              mode.c_str(), static_cast<long long>(row_bytes), kLayers, kKv, kBudget, full_bytes / 1e6, t_full * 1e3,
              full_bytes / t_full / 1e9, bulk_bytes / t_bulk / 1e9);
  CHECK_OK(ApplyElasticPlan(*plan0, last, mm));

  for (double keep : {0.5, 0.7, 0.8, 0.9, 0.95}) {
    IndexSets now = Sets(len, rng, &last, keep);
    auto plan = PlanElasticLoads(cm, now);
    CHECK_OK(plan.status());
    const double bytes = 2.0 * plan->copies.head_rows * row_bytes * kLayers;
    const double t = TimeLoads(*b, plan->copies, reps);
    std::printf("%s row %lld B | overlap %.2f: elastic %lld rows/layer (K+V) %.1f MB in %.3f ms (%.1f GB/s) vs full "
                "%.1f MB in %.3f ms: %.2fx less time\n",
                mode.c_str(), static_cast<long long>(row_bytes), plan->overlap_ratio(),
                static_cast<long long>(2 * plan->copies.head_rows), bytes / 1e6, t * 1e3, bytes / t / 1e9,
                full_bytes / 1e6, t_full * 1e3, t_full / t);
    CHECK_OK(ApplyElasticPlan(*plan, now, mm));
    last = std::move(now);
  }
  cudaFree(dst);
  cudaStreamDestroy(st);
}

}  // namespace
}  // namespace specontext

#include "tests/cuda/cuda_decode_bench.inc"

int main(int argc, char** argv) {
  int capacity = 16384, reps = 5;
  std::string section = "all";
  std::vector<std::string> modes;  // the elastic section's host tiers (--alloc; default pinned)
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--capacity") capacity = std::atoi(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--section") section = argv[i + 1];
    else if (a == "--alloc") {
      std::stringstream ss(argv[i + 1]);
      for (std::string m; std::getline(ss, m, ',');) modes.push_back(m);
    }
  }
  if (modes.empty()) modes = {"pinned"};
  if (capacity <= specontext::kBudget) {
    std::fprintf(stderr, "--capacity must exceed the budget %d\n", specontext::kBudget);
    return 1;
  }
  if (section == "footprint") {
    if (specontext::CudaDeviceCount() == 0) {
      std::fprintf(stderr, "no CUDA device\n");
      return 1;
    }
    specontext::footprint::Options o;
    if (!specontext::footprint::Parse(argc, argv, &o)) return 1;
    for (auto mode : o.modes) specontext::footprint::RunMode(o, mode);
    return 0;
  }
  const bool elastic = section == "all" || section == "elastic";
  for (const auto& m : modes) {
    if (elastic && !specontext::host_tier::KnownMode(m)) {
      std::fprintf(stderr, "--alloc: unknown mode '%s' (pinned, hostalloc, register4k, thp, hugetlb, vmmhost, "
                   "kvstore)\n", m.c_str());
      return 1;
    }
#if SPC_GATHER_BENCH_KVSTORE
    if (elastic && m == "kvstore") {
      // The largest segment of the section (512-byte rows), checked before anything runs.
      const int64_t tensor_bytes = int64_t{specontext::kKv} * capacity * 512;
      auto plan = specontext::host_tier::PlanSegment("spc_gather_bench_check", 2 * specontext::kLayers, tensor_bytes);
      absl::Status st = plan.ok() ? specontext::host_tier::CheckShm(plan->segment_bytes) : plan.status();
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
        return 1;
      }
    }
#endif
  }
  if (specontext::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  const double copy_gbs = specontext::bench::CopyBandwidth();
  std::printf("device copy bandwidth (read + write, 1 GiB D2D): %.0f GB/s: the floors below use it\n", copy_gbs);
  if (elastic) {
    for (const auto& m : modes) {
      for (int hd : {128, 256}) specontext::Run(hd, capacity, reps, m);
    }
  }
  if (section == "all" || section == "attn") specontext::bench::AttentionSweep(copy_gbs, std::max(reps, 10));
  if (section == "all" || section == "select") specontext::bench::SelectionSweep(copy_gbs, std::max(reps, 10));
  return 0;
}
