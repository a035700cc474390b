// Backend::AttentionWorkspaceBytes of the CUDA backend against what attention actually allocates: every step
// of a shape (prompt chunks, mixed batches, decode-only batches of every size, sparse decode with the
// weak-retrieval fallback's whole pasts, batch-invariant mode off and on) must complete under a device limit
// of the memory held before the first step plus the bound. The backend grows its attention buffers (split-K
// partials, batch metadata and work lists, index sets) on demand as MemoryKind::kWorkspace; past the limit an
// allocation fails with ResourceExhausted (the planner's step bound exists so that it never does mid-run).
// Each case runs twice: without a limit, to read the memory report before and after (what the steps held),
// then under the limit. The sparse plan's split bounds against the plan itself, over the sums of keys (host
// code: runs without a GPU too, with the occupancy the plan then assumes).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/kernels/sparse_kernels.h"
#include "core/sparse/index_sets.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Case {
  std::string name;
  int head_dim, n_kv, group, n_layers;
  int max_seqs, max_tokens, max_context;
  int budget = 0;            // 0: dense attention only
  bool batch_level = false;  // one index set per sequence instead of one per KV head
  bool fallback = false;     // flag sequences dense_resident (their whole past in the resident layers)
};

AttentionWorkspaceShape ShapeOf(const Case& c) {
  AttentionWorkspaceShape s;
  s.max_seqs = c.max_seqs;
  s.max_tokens = c.max_tokens;
  s.n_layers = c.n_layers;
  s.n_heads = c.n_kv * c.group;
  s.n_kv_heads = c.n_kv;
  s.head_dim = c.head_dim;
  s.budget = c.budget;
  s.max_context = c.max_context;
  s.sets_per_seq = c.batch_level ? 1 : c.n_kv;
  s.dense_fallback = c.fallback;
  return s;
}

// One batch: per sequence {past, new tokens}; sparse: a decode step over index sets (every n is 1).
struct Batch {
  std::vector<std::pair<int, int>> seqs;
  bool sparse = false;
};

// The steps of a case: prompt chunks of up to max_tokens over up to max_seqs sequences, mixed batches,
// decode-only batches of every size at the longest pasts, then sparse decode steps (sets of the budget, the
// first sequences flagged with the fallback, the longest past first).
std::vector<Batch> StepsOf(const Case& c) {
  std::vector<Batch> out;
  const int S = c.max_seqs, last = c.max_context - 1;
  // Prompt chunks: the whole step on one sequence, then spread over every sequence, with pasts.
  out.push_back({{{0, c.max_tokens}}});
  Batch spread;
  for (int i = 0; i < S; ++i) {
    const int n = c.max_tokens / S + (i < c.max_tokens % S ? 1 : 0);
    if (n > 0) spread.seqs.push_back({std::min(last + 1 - n, 17 * i), n});
  }
  out.push_back(spread);
  // Mixed: one prompt chunk beside decoding rows of every other sequence at long pasts.
  Batch mixed;
  mixed.seqs.push_back({0, std::max(1, c.max_tokens - (S - 1))});
  for (int i = 1; i < S; ++i) mixed.seqs.push_back({last - i % 7, 1});
  out.push_back(mixed);
  // Decode-only at every batch size, long pasts, and one at short pasts.
  for (int b = 1; b <= S; ++b) {
    Batch d;
    for (int i = 0; i < b; ++i) d.seqs.push_back({last - (i * 131) % std::max(1, last / 2), 1});
    out.push_back(d);
  }
  Batch shorts;
  for (int i = 0; i < S; ++i) shorts.seqs.push_back({1 + i, 1});
  out.push_back(shorts);
  if (c.budget > 0) {
    for (int b : {S, 1, (S + 1) / 2}) {
      Batch sp;
      sp.sparse = true;
      for (int i = 0; i < b; ++i) sp.seqs.push_back({i == 0 ? last : std::max(1, last - 977 * i % last), 1});
      out.push_back(sp);
    }
    Batch short_sets;  // one long list beside many short ones: the plan's most splits
    short_sets.sparse = true;
    for (int i = 0; i < S; ++i) short_sets.seqs.push_back({i == 0 ? last : 1 + i, 1});
    out.push_back(short_sets);
  }
  return out;
}

// What the steps read and write besides the attention's own buffers, allocated before the first step: resident
// KV of every sequence (kKvCache, max_context rows) and the largest step's q, out, k_cur, v_cur (kOther, zeroed;
// a step takes their first rows).
struct Setup {
  std::vector<SequenceKv> kv;
  Tensor q, out, kc, vc;
};

bool MakeSetup(Backend& gpu, const Case& c, Setup* st) {
  auto alloc = [&](const Shape& shape, MemoryKind kind, Tensor* t) {
    auto a = gpu.Alloc(DType::kBF16, shape, kind);
    EXPECT_TRUE(a.ok()) << a.status();
    if (!a.ok()) return false;
    *t = *a;
    const absl::Status z = gpu.Zero(t);
    EXPECT_TRUE(z.ok()) << z;
    return z.ok();
  };
  st->kv.resize(c.max_seqs);
  for (SequenceKv& s : st->kv) {
    s.capacity = c.max_context;
    for (int l = 0; l < c.n_layers; ++l) {
      for (std::vector<Tensor>* side : {&s.k, &s.v}) {
        side->emplace_back();
        if (!alloc({c.n_kv, c.max_context, c.head_dim}, MemoryKind::kKvCache, &side->back())) return false;
      }
    }
  }
  const int64_t rows = std::max(c.max_tokens, c.max_seqs), n_heads = c.n_kv * c.group;
  return alloc({rows, n_heads, c.head_dim}, MemoryKind::kOther, &st->q) &&
         alloc({rows, n_heads, c.head_dim}, MemoryKind::kOther, &st->out) &&
         alloc({rows, c.n_kv, c.head_dim}, MemoryKind::kOther, &st->kc) &&
         alloc({rows, c.n_kv, c.head_dim}, MemoryKind::kOther, &st->vc) && gpu.Synchronize().ok();
}

// Sets of the budget: each sequence's last min(past, budget) positions (which ones does not matter here).
IndexSets SetsOf(const Case& c, const Batch& b) {
  IndexSets s;
  const int per = c.batch_level ? 1 : c.n_kv, n = static_cast<int>(b.seqs.size());
  s.Reset(n, c.n_kv, per, c.budget);
  for (int i = 0; i < n; ++i) {
    const int len = b.seqs[i].first, m = std::min(len, c.budget);
    s.seq_len[i] = len;
    for (int k = 0; k < per; ++k) {
      for (int j = 0; j < m; ++j) s.indices.push_back(len - m + j);
      s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
    }
  }
  return s;
}

// Runs every step of `c` on `gpu`; the first failure's status (OK when all complete).
absl::Status RunSteps(Backend& gpu, const Case& c, Setup& setup) {
  const int hd = c.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (const Batch& b : StepsOf(c)) {
    BatchDesc desc;
    int tokens = 0;
    for (size_t i = 0; i < b.seqs.size(); ++i) {
      desc.seqs.push_back({tokens, b.seqs[i].second, b.seqs[i].first});
      desc.kv.push_back(&setup.kv[i]);
      tokens += b.seqs[i].second;
    }
    desc.n_tokens = tokens;
    if (absl::Status st = gpu.PrepareBatch(desc); !st.ok()) return st;
    const Tensor q = setup.q.Rows(0, tokens), kc = setup.kc.Rows(0, tokens), vc = setup.vc.Rows(0, tokens);
    Tensor out = setup.out.Rows(0, tokens);
    IndexSets sets;
    std::vector<uint8_t> dense;
    if (b.sparse) {
      sets = SetsOf(c, b);
      SparseDecodeDesc sd;
      sd.sets = &sets;
      if (c.fallback) {
        dense.assign(b.seqs.size(), 0);
        for (size_t i = 0; i < dense.size(); i += 2) dense[i] = 1;  // the longest (first) and every other one
        sd.dense_resident = dense;
      }
      if (absl::Status st = gpu.PrepareSparseDecode(sd); !st.ok()) return st;
    }
    for (int l = 0; l < c.n_layers; ++l) {
      const absl::Status st =
          b.sparse ? gpu.SparseAttention(l, q, kc, vc, scale, &out) : gpu.Attention(l, q, scale, &out);
      if (!st.ok()) return absl::Status(st.code(), absl::StrCat("layer ", l, ": ", st.message()));
    }
    if (absl::Status st = gpu.Synchronize(); !st.ok()) return st;
  }
  return absl::OkStatus();
}

void RunCase(const Case& c) {
  for (bool invariant : {false, true}) {
    const std::string what = absl::StrCat(c.name, invariant ? " batch-invariant" : "");
    CudaBackendOptions o;
    o.batch_invariant = invariant;
    o.cuda_graphs = false;
    int64_t before = 0, bound = 0;
    {
      std::unique_ptr<Backend> gpu = MakeGpuOrNull(o);
      if (gpu == nullptr) GTEST_SKIP() << "no CUDA device";
      Setup setup;
      ASSERT_TRUE(MakeSetup(*gpu, c, &setup)) << what;
      const MemoryReport r0 = gpu->memory_report();
      before = r0.total;
      bound = gpu->AttentionWorkspaceBytes(ShapeOf(c));
      const absl::Status st = RunSteps(*gpu, c, setup);
      ASSERT_TRUE(st.ok()) << what << " without a limit: " << st;
      const MemoryReport r1 = gpu->memory_report();
      const size_t ws = static_cast<size_t>(MemoryKind::kWorkspace);
      // Held after the steps (with blocks the growth left in the workspace cache) and at the peak.
      std::printf("%s: attention workspace %lld bytes held after the steps (peak total +%lld), bound %lld\n",
                  what.c_str(), static_cast<long long>(r1.bytes[ws] - r0.bytes[ws]),
                  static_cast<long long>(r1.peak - r0.total), static_cast<long long>(bound));
      EXPECT_GT(bound, 0) << what;
    }
    // Under a limit of what was held before the steps plus the bound: every step completes.
    o.memory_limit = before + bound;
    std::unique_ptr<Backend> gpu = MakeGpuOrNull(o);
    ASSERT_NE(gpu, nullptr);
    Setup setup;
    ASSERT_TRUE(MakeSetup(*gpu, c, &setup)) << what;
    ASSERT_EQ(gpu->memory_report().total, before) << what << ": the setup allocates differently the second time";
    const absl::Status st = RunSteps(*gpu, c, setup);
    EXPECT_TRUE(st.ok()) << what << " under a limit of the setup plus the bound (" << bound << " bytes): " << st;
  }
}

// SparseAttentionMaxSplits against PlanSparseAttention at every sum of keys of the range (or a fine sample of a
// long one): never fewer, and for the tensor-core plan the same maximum where every sum is tried.
TEST(CudaAttentionWorkspace, SparseSplitBoundsCoverThePlan) {
  using cuda::PlanSparseAttention;
  using cuda::PlanSparseAttentionInvariant;
  using cuda::SparseAttentionMaxSplits;
  using cuda::SparseAttentionSplitsCeiling;
  using cuda::SparseAttnParams;
  struct Shape {
    int n_heads, n_kv, head_dim;
  };
  for (const Shape sh : {Shape{32, 8, 128}, Shape{16, 2, 64}, Shape{32, 2, 128}}) {  // the last: generic kernel
    SparseAttnParams shape;
    shape.n_heads = sh.n_heads;
    shape.n_kv = sh.n_kv;
    shape.head_dim = sh.head_dim;
    for (int sm : {1, 16, 132}) {
      for (int keys : {1, 63, 129, 1024, 2049, 5120, 33792}) {
        for (auto [lo, hi] : {std::pair<int64_t, int64_t>{1, 1}, {2, 9}, {8, 512}}) {
          const int bound = SparseAttentionMaxSplits(keys, lo, hi, sm, false, shape);
          EXPECT_LE(bound, SparseAttentionSplitsCeiling(keys, false));
          const int64_t span = (hi - lo) * keys, step = std::max<int64_t>(1, span / 20000);
          int most = 0;
          for (int64_t sum = lo * keys; sum <= hi * keys; sum += step) {
            SparseAttnParams p = shape;
            PlanSparseAttention(sum, keys, sm, &p);
            most = std::max(most, p.max_splits);
            ASSERT_LE(p.max_splits, bound) << "n_heads=" << sh.n_heads << " n_kv=" << sh.n_kv << " hd=" << sh.head_dim
                                           << " sm=" << sm << " max_keys=" << keys << " sum_keys=" << sum;
          }
          if (step == 1 && sh.n_heads / sh.n_kv <= 8) EXPECT_EQ(most, bound) << "max_keys=" << keys << " sm=" << sm;
        }
      }
    }
  }
  for (int keys : {1, 255, 257, 33792}) {
    SparseAttnParams p;
    PlanSparseAttentionInvariant(keys, &p);
    EXPECT_EQ(p.max_splits, SparseAttentionSplitsCeiling(keys, true));
    EXPECT_EQ(p.max_splits, SparseAttentionMaxSplits(keys, 1, 64, 132, true, p));
  }
}

// Dense attention: tensor-core head dims (host-built plan, decode-only device plan, batch-invariant splits)
// and the simple kernel (no partials).
TEST(CudaAttentionWorkspace, DenseAttentionStaysWithinTheBound) {
  RunCase({"8B-like hd=128 n_kv=8 group=4", 128, 8, 4, 2, 32, 512, 4096});
  RunCase({"hd=64 n_kv=2 group=8 odd", 64, 2, 8, 3, 5, 97, 2049});
  RunCase({"hd=128 n_kv=1 group=16 batch 1", 128, 1, 16, 2, 1, 17, 3001});
  RunCase({"simple kernel hd=80", 80, 2, 3, 2, 7, 33, 517});
}

// Sparse decode: sets of the budget, the weak-retrieval fallback's whole pasts, both sparse kernels.
TEST(CudaAttentionWorkspace, SparseAttentionStaysWithinTheBound) {
  Case a{"8B-like sparse fallback", 128, 8, 4, 2, 32, 256, 4096};
  a.budget = 256;
  a.fallback = true;
  RunCase(a);
  Case b{"hd=64 group=8 batch-level odd budget", 64, 2, 8, 2, 9, 97, 3001};
  b.budget = 517;
  b.batch_level = true;
  RunCase(b);
  Case g{"generic kernel group=16 fallback", 128, 2, 16, 2, 5, 64, 2049};
  g.budget = 100;
  g.fallback = true;
  RunCase(g);
}

}  // namespace
}  // namespace specontext::testing
