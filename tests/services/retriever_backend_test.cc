// RetrieverSession on a Backend (HeadRunner: `specontext-retriever --backend cuda|auto`) against the f32 host
// reference path (`--backend cpu`), on random heads (layer, Qwen-style, YaRN, EAGLE-3 with fused features)
// and random prompts: head- and batch-level selection, sinks, budgets below and past the length.
//
// CPU backend: the same sets as the host path, up to near-ties (the two forwards round differently, f32
// GEMM order): a position only one path kept must weigh, by the host path's own f32 scores, within 1e-5 of
// the weakest non-sink position the host kept. Limits, error codes and messages and accounted bytes are
// the same. CUDA backend (skipped without a GPU): bf16 caches, so the sets overlap the reference's >= 0.99.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iterator>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/runtime/runtime.h"
#include "core/sparse/retrieval_head.h"
#include "retriever/head_runner.h"
#include "retriever/retriever_session.h"
#include "tests/sparse/head_fixture.h"

namespace specontext {
namespace {

using retriever::HeadRunner;
using retriever::RetrieverSession;
using retriever::RetrieverTotals;
using retriever::SessionLimits;
using testing_sparse::HeadShape;

uint32_t FreshSeed() { return std::random_device{}(); }

// The host reference's view of one sequence (what the host session holds), to weigh positions.
struct Reference {
  std::unique_ptr<RetrievalKvCache> cache;
  Tensor last_q;  // [n_heads, head_dim]
};

// Per set of `sets` (host-path layout): the combined softmax weight of every past position (max over the
// set's query heads), from the host reference's f32 q and K.
std::vector<std::vector<float>> SetWeights(const RetrievalHead& head, const Reference& r, int32_t len,
                                           SelectionMode mode) {
  const int64_t nh = head.n_heads(), nkv = head.n_kv_heads(), hd = head.head_dim(), group = nh / nkv;
  const int64_t cap = r.cache->k().dim(1);
  const int64_t sets = mode == SelectionMode::kBatchLevel ? 1 : nkv;
  std::vector<std::vector<float>> w(sets, std::vector<float>(len, 0.0f));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<double> s(len);
  for (int64_t h = 0; h < nh; ++h) {
    const int64_t g = h / group;
    const float* q = r.last_q.as<float>() + h * hd;
    double mx = -1e300;
    for (int32_t t = 0; t < len; ++t) {
      const float* k = r.cache->k().as<float>() + (g * cap + t) * hd;
      double dot = 0;
      for (int64_t d = 0; d < hd; ++d) dot += double(q[d]) * k[d];
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    double sum = 0;
    for (int32_t t = 0; t < len; ++t) sum += std::exp(s[t] - mx);
    auto& ws = w[mode == SelectionMode::kBatchLevel ? 0 : g];
    for (int32_t t = 0; t < len; ++t) ws[t] = std::max(ws[t], static_cast<float>(std::exp(s[t] - mx) / sum));
  }
  return w;
}

struct Overlap {
  int64_t kept = 0, shared = 0;
  double ratio() const { return kept == 0 ? 1.0 : double(shared) / kept; }
};

// Same layout as `want`; per set the positions overlap, and where they differ (tie_eps > 0) only near-ties.
// Captured mass: within mass_tol of want's, plus the reference weight of the positions only one side kept
// (a near-tie swap moves a query head's mass by up to that weight).
void CompareSelections(const RetrievalHead& head, const std::vector<Reference>& refs, const SelectionResult& want,
                       const SelectionResult& got, int32_t sink, SelectionMode mode, double tie_eps, double mass_tol,
                       Overlap* overlap) {
  const IndexSets &a = want.sets, &b = got.sets;
  ASSERT_TRUE(ValidateIndexSets(b).ok());
  ASSERT_EQ(a.n_seqs, b.n_seqs);
  ASSERT_EQ(a.sets_per_seq, b.sets_per_seq);
  ASSERT_EQ(a.n_kv_heads, b.n_kv_heads);
  ASSERT_EQ(a.seq_len, b.seq_len);
  ASSERT_EQ(a.indptr, b.indptr);  // the same number of positions per set
  ASSERT_EQ(want.n_q_heads, got.n_q_heads);
  ASSERT_EQ(want.captured_mass.size(), got.captured_mass.size());
  for (int32_t i = 0; i < a.n_seqs; ++i) {
    const int32_t len = a.seq_len[i];
    std::vector<std::vector<float>> w;
    double swapped = 0;  // reference weight of the positions only one side kept
    for (int32_t s = 0; s < a.sets_per_seq; ++s) {
      const int32_t set = i * a.sets_per_seq + s;
      std::span<const int32_t> pa = a.SetPositions(set), pb = b.SetPositions(set);
      std::vector<int32_t> common;
      std::set_intersection(pa.begin(), pa.end(), pb.begin(), pb.end(), std::back_inserter(common));
      overlap->kept += static_cast<int64_t>(pa.size());
      overlap->shared += static_cast<int64_t>(common.size());
      if (common.size() == pa.size()) continue;
      if (w.empty()) w = SetWeights(head, refs[i], len, mode);
      for (auto [x, y] : {std::pair{pa, pb}, std::pair{pb, pa}}) {
        for (int32_t p : x) {
          if (!std::binary_search(y.begin(), y.end(), p)) swapped += w[s][p];
        }
      }
      if (tie_eps <= 0) continue;
      // The weakest position the host kept by score (sinks are kept regardless).
      float threshold = 2.0f;
      const int32_t n_sink = std::min<int32_t>(sink, static_cast<int32_t>(pa.size()));
      for (int32_t p : pa) {
        if (p >= n_sink) threshold = std::min(threshold, w[s][p]);
      }
      auto near_tie = [&](std::span<const int32_t> from, std::span<const int32_t> other) {
        for (int32_t p : from) {
          if (std::binary_search(other.begin(), other.end(), p)) continue;
          EXPECT_LE(std::fabs(w[s][p] - threshold), tie_eps)
              << "seq " << i << " set " << s << " position " << p << " weight " << w[s][p] << " vs threshold "
              << threshold << " (len " << len << ", budget " << pa.size() << ")";
        }
      };
      near_tie(pa, pb);
      near_tie(pb, pa);
    }
    for (int32_t h = 0; h < want.n_q_heads; ++h) {
      const size_t m = static_cast<size_t>(i) * want.n_q_heads + h;
      EXPECT_NEAR(want.captured_mass[m], got.captured_mass[m], mass_tol + swapped) << "seq " << i << " head " << h;
    }
  }
}

// Drives a host-path session and a runner session (and the host reference) with the same random
// prompts and decode steps, selecting after each step with budgets below and past the length.
void RunAgainstHostPath(std::unique_ptr<Backend> backend, const HeadShape& shape,
                        int32_t max_prompt, SelectionMode mode, double tie_eps, double mass_tol, double min_overlap,
                        uint32_t seed, bool same_bytes) {
  SCOPED_TRACE(absl::StrCat("seed ", seed, " hd ", shape.head_dim, " heads ", shape.n_heads, "/", shape.n_kv,
                            shape.kind == RetrievalHeadKind::kEagle3 ? " eagle3" : " layer",
                            mode == SelectionMode::kBatchLevel ? " batch-level" : " head-level"));
  std::mt19937 rng(seed);
  auto rh = testing_sparse::MakeRandomHead(shape, rng);
  ASSERT_TRUE(rh.ok()) << rh.status();
  const RetrievalHead& head = *rh->head;
  auto runner = HeadRunner::Create(head, std::move(backend));
  ASSERT_TRUE(runner.ok()) << runner.status();
  RetrieverTotals host_totals, dev_totals;
  SessionLimits limits;
  Overlap overlap;
  {
    RetrieverSession host(&head, limits, &host_totals);
    RetrieverSession dev(&head, limits, &dev_totals, runner->get());
    constexpr int kSeqs = 3;
    const int32_t max_tokens = 1200;
    std::vector<Reference> refs(kSeqs);
    for (int s = 0; s < kSeqs; ++s) {
      ASSERT_TRUE(host.Open(10 + s, max_tokens).ok());
      ASSERT_TRUE(dev.Open(10 + s, max_tokens).ok());
      refs[s].cache = std::make_unique<RetrievalKvCache>(head.n_kv_heads(), head.head_dim());
    }
    const int64_t nh = head.n_heads(), hd = head.head_dim(), fw = head.fused_width();
    const int32_t budgets[] = {1, 7, 33, 5000};  // 5000 >= every length: all positions
    const int32_t sinks[] = {0, 1, 4};
    for (int step = 0; step < 4; ++step) {
      for (int s = 0; s < kSeqs; ++s) {
        std::vector<int32_t> ids(step == 0 ? std::uniform_int_distribution<int>(1, max_prompt)(rng) : 1);
        for (int32_t& t : ids) t = static_cast<int32_t>(rng() % shape.vocab);
        const int64_t n = static_cast<int64_t>(ids.size());
        std::vector<float> fused(n * fw);
        std::uniform_real_distribution<float> u(-2.0f, 2.0f);
        for (float& f : fused) f = u(rng);
        ASSERT_TRUE(host.Observe(10 + s, ids, fused).ok());
        absl::Status st = dev.Observe(10 + s, ids, fused);
        ASSERT_TRUE(st.ok()) << st;
        Tensor fused_t;
        if (fw > 0) {
          fused_t = Tensor::HostEmpty(DType::kF32, {n, fw});
          std::copy(fused.begin(), fused.end(), fused_t.as<float>());
        }
        Tensor q = Tensor::HostEmpty(DType::kF32, {n, nh, hd});
        ASSERT_TRUE(head.Observe(ids, fused_t, refs[s].cache.get(), &q).ok());
        refs[s].last_q = *q.Rows(n - 1, n).Reshape({nh, hd});
      }
      if (same_bytes) {
        EXPECT_EQ(host_totals.cache_bytes.load(), dev_totals.cache_bytes.load());
      }
      for (int32_t budget : budgets) {
        for (int32_t sink : sinks) {
          if (sink > budget) continue;
          SCOPED_TRACE(absl::StrCat("step ", step, " budget ", budget, " sink ", sink));
          auto want = host.Select({10, 11, 12}, budget, sink, mode);
          ASSERT_TRUE(want.ok()) << want.status();
          auto got = dev.Select({10, 11, 12}, budget, sink, mode);
          ASSERT_TRUE(got.ok()) << got.status();
          CompareSelections(head, refs, *want, *got, sink, mode, tie_eps, mass_tol, &overlap);
          if (budget >= 5000) {
            EXPECT_EQ(want->sets.indices, got->sets.indices);  // every position: exact
          }
        }
      }
      // A subset, in another order.
      auto want = host.Select({12, 10}, 9, 1, mode);
      auto got = dev.Select({12, 10}, 9, 1, mode);
      ASSERT_TRUE(want.ok() && got.ok());
      std::vector<Reference> sub(2);
      sub[0].cache = std::move(refs[2].cache);
      sub[0].last_q = refs[2].last_q;
      sub[1].cache = std::move(refs[0].cache);
      sub[1].last_q = refs[0].last_q;
      CompareSelections(head, sub, *want, *got, 1, mode, tie_eps, mass_tol, &overlap);
      refs[2].cache = std::move(sub[0].cache);
      refs[0].cache = std::move(sub[1].cache);
    }
    ASSERT_TRUE(dev.Close(11).ok());
    EXPECT_EQ(dev_totals.sequences.load(), 2);
  }
  EXPECT_GE(overlap.ratio(), min_overlap) << overlap.shared << " of " << overlap.kept << " positions shared";
  EXPECT_EQ(dev_totals.cache_bytes.load(), 0);
  EXPECT_EQ(dev_totals.sequences.load(), 0);
  EXPECT_EQ(dev_totals.sessions.load(), 0);
}

std::vector<std::pair<HeadShape, int32_t>> Shapes() {
  std::vector<std::pair<HeadShape, int32_t>> v;
  HeadShape s;
  v.push_back({s, 40});  // layer, 4 heads over 2 KV heads of 8 dims
  s.bias = s.qk_norm = true;
  s.head_dim = 16;
  s.n_heads = 8;
  v.push_back({s, 300});  // Qwen-style
  s = HeadShape();
  s.yarn = true;
  s.head_dim = 64;
  s.n_heads = 8;
  s.n_kv = 4;
  v.push_back({s, 700});
  s = HeadShape();
  s.kind = RetrievalHeadKind::kEagle3;
  v.push_back({s, 97});
  s.fused_norm = FusedNorm::kPerLayer;
  s.fc_bias = true;
  s.qk_norm = true;
  v.push_back({s, 257});
  return v;
}

TEST(RetrieverSessionCpuBackend, SelectionsEqualTheHostPathUpToNearTies) {
  for (const auto& [shape, max_prompt] : Shapes()) {
    for (SelectionMode mode : {SelectionMode::kHeadLevel, SelectionMode::kBatchLevel}) {
      RunAgainstHostPath(MakeCpuBackend(), shape, max_prompt, mode, 1e-5, 1e-4, 0.99, FreshSeed(), true);
    }
  }
}

// Every limit and error of RetrieverSession (retriever_session.h) with the same code and message on both paths.
TEST(RetrieverSessionCpuBackend, LimitsAndErrorsAreUnchanged) {
  std::mt19937 rng(FreshSeed());
  HeadShape e;
  e.kind = RetrievalHeadKind::kEagle3;
  for (const HeadShape& shape : {HeadShape(), e}) {
    auto rh = testing_sparse::MakeRandomHead(shape, rng);
    ASSERT_TRUE(rh.ok()) << rh.status();
    const RetrievalHead& head = *rh->head;
    auto runner = HeadRunner::Create(head, MakeCpuBackend());
    ASSERT_TRUE(runner.ok()) << runner.status();
    SessionLimits limits;
    limits.max_sequences = 3;
    limits.max_tokens_per_sequence = 600;
    limits.max_tokens_per_observe = 50;
    limits.max_budget = 100;
    limits.max_reply_bytes = 2000;
    // Room for two sequences of 512 rows plus a third's first 256 (f32 on both paths).
    limits.max_total_cache_bytes = (1280 * head.n_kv_heads() + 3 * head.n_heads()) * head.head_dim() * 4;
    RetrieverTotals host_totals, dev_totals;
    RetrieverSession host(&head, limits, &host_totals);
    RetrieverSession dev(&head, limits, &dev_totals, runner->get());
    const int64_t fw = head.fused_width();
    auto same = [&](const char* what, auto op) {
      const absl::Status a = op(host), b = op(dev);
      EXPECT_EQ(a.code(), b.code()) << what << ": " << a << " vs " << b;
      EXPECT_EQ(a.message(), b.message()) << what;
      EXPECT_EQ(host_totals.cache_bytes.load(), dev_totals.cache_bytes.load()) << what;
      EXPECT_EQ(host_totals.sequences.load(), dev_totals.sequences.load()) << what;
      return a;
    };
    auto tokens = [&](int n) {
      std::vector<int32_t> ids(n);
      for (int32_t& t : ids) t = static_cast<int32_t>(rng() % shape.vocab);
      return ids;
    };
    auto observe = [&](uint64_t id, std::vector<int32_t> ids, int64_t fused_rows) {
      std::vector<float> fused(fused_rows * fw, 0.5f);
      return [=](RetrieverSession& s) { return s.Observe(id, ids, fused); };
    };
    auto select = [&](std::vector<uint64_t> ids, int32_t budget, int32_t sink) {
      return [=](RetrieverSession& s) { return s.Select(ids, budget, sink).status(); };
    };
    auto open = [](uint64_t id, int32_t max_tokens) {
      return [=](RetrieverSession& s) { return s.Open(id, max_tokens); };
    };
    EXPECT_EQ(same("open 0 bad", open(1, 0)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("open past max", open(1, 601)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(same("open 1", open(1, 600)).ok());
    EXPECT_EQ(same("open again", open(1, 600)).code(), absl::StatusCode::kAlreadyExists);
    EXPECT_TRUE(same("open 2", open(2, 512)).ok());
    EXPECT_EQ(same("select before observe", select({1}, 4, 1)).code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(same("observe unknown", observe(9, tokens(3), 3)).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(same("observe none", observe(1, {}, 0)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("observe too many", observe(1, tokens(51), 51)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("observe vocab", observe(1, {0, static_cast<int32_t>(shape.vocab)}, 2)).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("observe negative", observe(1, {-1}, 1)).code(), absl::StatusCode::kInvalidArgument);
    if (fw > 0) {
      EXPECT_EQ(same("observe fused rows", observe(1, tokens(3), 2)).code(), absl::StatusCode::kInvalidArgument);
    } else {
      EXPECT_EQ(same("observe stray fused", [&](RetrieverSession& s) {
                  return s.Observe(1, tokens(2), {1.0f});
                }).code(),
                absl::StatusCode::kInvalidArgument);
    }
    // Fill sequence 1 to 300 tokens (the cache doubles to 512 rows), sequence 2 to 512.
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(same("observe 1", observe(1, tokens(50), 50)).ok());
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(same("observe 2", observe(2, tokens(50), 50)).ok());
    ASSERT_TRUE(same("observe 2 end", observe(2, tokens(12), 12)).ok());
    EXPECT_EQ(same("observe past max_tokens", observe(2, tokens(1), 1)).code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(same("open 3", open(3, 600)).ok());
    EXPECT_EQ(same("open past max_sequences", open(4, 10)).code(), absl::StatusCode::kResourceExhausted);
    // Sequence 3 may grow to 256 rows, not past (the cache limit).
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(same("observe 3", observe(3, tokens(50), 50)).ok());
    EXPECT_EQ(same("observe past the cache limit", observe(3, tokens(7), 7)).code(),
              absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(same("select none", select({}, 4, 1)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select budget 0", select({1}, 0, 0)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select budget past max", select({1}, 101, 1)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select sink past budget", select({1}, 4, 5)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select sink negative", select({1}, 4, -1)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select twice", select({1, 2, 1}, 4, 1)).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(same("select unknown", select({1, 7}, 4, 1)).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(same("select past reply bytes", select({1, 2, 3}, 100, 1)).code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(same("select", select({1, 2, 3}, 20, 1)).ok());
    EXPECT_TRUE(same("close", [](RetrieverSession& s) { return s.Close(2); }).ok());
    EXPECT_EQ(same("close again", [](RetrieverSession& s) { return s.Close(2); }).code(),
              absl::StatusCode::kNotFound);
    EXPECT_TRUE(same("open after close", open(4, 100)).ok());
  }
}

// The host path (no runner) and the CPU backend path, for the ObserveBatch tests.
struct SessionPath {
  const char* name;
  bool runner;
};
constexpr SessionPath kPaths[] = {{"host", false}, {"cpu backend", true}};

// The path's runner: none on the host path, one on a fresh CPU backend otherwise.
absl::StatusOr<std::unique_ptr<HeadRunner>> RunnerFor(const SessionPath& path, const RetrievalHead& head) {
  if (!path.runner) return std::unique_ptr<HeadRunner>();
  return HeadRunner::Create(head, MakeCpuBackend());
}

std::vector<int32_t> RandomTokens(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> ids(n);
  for (int32_t& t : ids) t = static_cast<int32_t>(rng() % vocab);
  return ids;
}

std::vector<float> RandomFused(std::mt19937& rng, int64_t n, int64_t fw) {
  std::vector<float> fused(n * fw);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (float& f : fused) f = u(rng);
  return fused;
}

void ExpectSameSelection(const absl::StatusOr<SelectionResult>& a, const absl::StatusOr<SelectionResult>& b) {
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->sets.seq_len, b->sets.seq_len);
  EXPECT_EQ(a->sets.indptr, b->sets.indptr);
  EXPECT_EQ(a->sets.indices, b->sets.indices);
  EXPECT_EQ(a->captured_mass, b->captured_mass);
}

// One ObserveBatch per step (prompts of odd lengths, then decode tokens, in a shuffled sequence order)
// leaves the same caches as the same Observes one by one. Host path: bit for bit (the same loop), so
// identical Selections. CPU backend: the batch is one forward of all its rows (as the in-process decoder
// observes a step) where one by one each Observe is its own, and the f32 GEMM rounds a row differently
// for another row count (sgemv at one row, sgemm blocks above): identical up to near-ties, every position
// exact, and the same accounted bytes on both.
TEST(RetrieverSessionObserveBatch, EqualsTheObservesOneByOne) {
  for (const auto& [shape, max_prompt] : Shapes()) {
    for (const SessionPath& path : kPaths) {
      const uint32_t seed = FreshSeed();
      SCOPED_TRACE(absl::StrCat(path.name, " seed ", seed, " max_prompt ", max_prompt));
      std::mt19937 rng(seed);
      auto rh = testing_sparse::MakeRandomHead(shape, rng);
      ASSERT_TRUE(rh.ok()) << rh.status();
      const RetrievalHead& head = *rh->head;
      auto runner = RunnerFor(path, head);
      ASSERT_TRUE(runner.ok()) << runner.status();
      RetrieverTotals one_totals, batch_totals;
      RetrieverSession one(&head, {}, &one_totals, runner->get());
      RetrieverSession batched(&head, {}, &batch_totals, runner->get());
      std::vector<uint64_t> ids = {3, 17, 5, 8};
      std::map<uint64_t, Reference> refs;  // the host reference's caches, to weigh near-ties
      Overlap overlap;
      for (uint64_t id : ids) {
        ASSERT_TRUE(one.Open(id, 1500).ok());
        ASSERT_TRUE(batched.Open(id, 1500).ok());
        refs[id].cache = std::make_unique<RetrievalKvCache>(head.n_kv_heads(), head.head_dim());
      }
      const int64_t fw = head.fused_width(), nh = head.n_heads(), hd = head.head_dim();
      for (int step = 0; step < 5; ++step) {
        std::shuffle(ids.begin(), ids.end(), rng);
        const size_t n_seqs = step == 2 ? 1 : ids.size();  // one step of a single sequence
        std::vector<std::vector<int32_t>> tokens(n_seqs);
        std::vector<std::vector<float>> fused(n_seqs);
        std::vector<RetrieverSession::ObserveEntry> entries;
        for (size_t i = 0; i < n_seqs; ++i) {
          const int64_t n = step == 0 ? std::uniform_int_distribution<int>(1, max_prompt)(rng) : (step == 3 ? 3 : 1);
          tokens[i] = RandomTokens(rng, n, shape.vocab);
          fused[i] = RandomFused(rng, n, fw);
          ASSERT_TRUE(one.Observe(ids[i], tokens[i], fused[i]).ok());
          entries.push_back({ids[i], tokens[i], fused[i]});
          Tensor fused_t;
          if (fw > 0) {
            fused_t = Tensor::HostEmpty(DType::kF32, {n, fw});
            std::copy(fused[i].begin(), fused[i].end(), fused_t.as<float>());
          }
          Tensor q = Tensor::HostEmpty(DType::kF32, {n, nh, hd});
          ASSERT_TRUE(head.Observe(tokens[i], fused_t, refs[ids[i]].cache.get(), &q).ok());
          refs[ids[i]].last_q = *q.Rows(n - 1, n).Reshape({nh, hd});
        }
        absl::Status st = batched.ObserveBatch(entries);
        ASSERT_TRUE(st.ok()) << st;
        EXPECT_EQ(one_totals.cache_bytes.load(), batch_totals.cache_bytes.load()) << "step " << step;
        for (int32_t budget : {1, 9, 64, 5000}) {
          for (SelectionMode mode : {SelectionMode::kHeadLevel, SelectionMode::kBatchLevel}) {
            SCOPED_TRACE(absl::StrCat("step ", step, " budget ", budget));
            const std::vector<uint64_t> order = {3, 17, 5, 8};
            auto want = one.Select(order, budget, 1, mode);
            auto got = batched.Select(order, budget, 1, mode);
            if (!path.runner) {
              ExpectSameSelection(want, got);
              continue;
            }
            ASSERT_TRUE(want.ok() && got.ok());
            std::vector<Reference> sub;
            for (uint64_t id : order) {
              Reference& r = refs[id];
              sub.push_back({std::move(r.cache), r.last_q});
            }
            CompareSelections(head, sub, *want, *got, 1, mode, 1e-5, 1e-4, &overlap);
            for (size_t i = 0; i < order.size(); ++i) refs[order[i]].cache = std::move(sub[i].cache);
            if (budget >= 5000) EXPECT_EQ(want->sets.indices, got->sets.indices);
          }
        }
      }
      EXPECT_GE(overlap.ratio(), 0.99) << overlap.shared << " of " << overlap.kept << " positions shared";
    }
  }
}

// A batch with one bad entry is refused whole, with the error a single Observe of that entry gets (or
// InvalidArgument for an id named twice, too many tokens over the batch, or no entry), and changes
// nothing: the byte totals stay, and later Selections equal those of a session that never saw the batch.
TEST(RetrieverSessionObserveBatch, OneBadEntryRefusesTheWholeBatch) {
  HeadShape e;
  e.kind = RetrievalHeadKind::kEagle3;
  for (const HeadShape& shape : {HeadShape(), e}) {
    for (const SessionPath& path : kPaths) {
      const uint32_t seed = FreshSeed();
      SCOPED_TRACE(absl::StrCat(path.name, " seed ", seed, shape.kind == RetrievalHeadKind::kEagle3 ? " eagle3" : ""));
      std::mt19937 rng(seed);
      auto rh = testing_sparse::MakeRandomHead(shape, rng);
      ASSERT_TRUE(rh.ok()) << rh.status();
      const RetrievalHead& head = *rh->head;
      auto runner = RunnerFor(path, head);
      ASSERT_TRUE(runner.ok()) << runner.status();
      SessionLimits limits;
      limits.max_tokens_per_sequence = 600;
      limits.max_tokens_per_observe = 50;
      // Sequences 1 and 2 at 256 rows and 3 at 300 of its 310 tokens (512 rows on the host, capped at 310 on
      // a backend), with room for one of 1 or 2 doubling to 512, not both.
      const int64_t rows3 = path.runner ? 310 : 512;
      limits.max_total_cache_bytes =
          ((rows3 + 256 + 256 + 256 + 100) * head.n_kv_heads() + 3 * head.n_heads()) * head.head_dim() * 4;
      RetrieverTotals ref_totals, totals;
      RetrieverSession ref(&head, limits, &ref_totals, runner->get());
      RetrieverSession session(&head, limits, &totals, runner->get());
      const int64_t fw = head.fused_width();
      struct Obs {
        uint64_t id;
        std::vector<int32_t> tokens;
        std::vector<float> fused;
      };
      auto make = [&](uint64_t id, int64_t n) {
        return Obs{id, RandomTokens(rng, n, shape.vocab), RandomFused(rng, n, fw)};
      };
      auto entries = [](const std::vector<Obs>& v) {
        std::vector<RetrieverSession::ObserveEntry> out;
        for (const Obs& o : v) out.push_back({o.id, o.tokens, o.fused});
        return out;
      };
      auto both = [&](const std::vector<Obs>& v) {
        ASSERT_TRUE(ref.ObserveBatch(entries(v)).ok());
        ASSERT_TRUE(session.ObserveBatch(entries(v)).ok());
      };
      for (uint64_t id : {1, 2, 3}) {
        ASSERT_TRUE(ref.Open(id, id == 3 ? 310 : 600).ok());
        ASSERT_TRUE(session.Open(id, id == 3 ? 310 : 600).ok());
      }
      // Sequence 3 to 300 tokens, 1 and 2 to 250 (256 rows).
      for (int i = 0; i < 5; ++i) both({make(1, 25), make(2, 25)});
      for (int i = 0; i < 5; ++i) both({make(1, 25), make(2, 25)});
      for (int i = 0; i < 6; ++i) both({make(3, 50)});
      ASSERT_EQ(ref_totals.cache_bytes.load(), totals.cache_bytes.load());
      const int64_t bytes = totals.cache_bytes.load();

      auto expect_refused = [&](const char* what, std::vector<Obs> batch, size_t bad, absl::StatusCode code) {
        SCOPED_TRACE(what);
        uint64_t failed = 0;
        const absl::Status st = session.ObserveBatch(entries(batch), &failed);
        EXPECT_EQ(st.code(), code) << st;
        if (bad < batch.size()) {
          // The single Observe of the bad entry: the same code and message, and the failing id.
          const absl::Status single = session.Observe(batch[bad].id, batch[bad].tokens, batch[bad].fused);
          EXPECT_EQ(single.code(), st.code()) << single;
          EXPECT_EQ(single.message(), st.message());
          EXPECT_EQ(failed, batch[bad].id);
        }
        EXPECT_EQ(totals.cache_bytes.load(), bytes);
        EXPECT_EQ(totals.sequences.load(), 3);
      };
      using absl::StatusCode;
      expect_refused("unknown id", {make(1, 1), make(9, 1), make(2, 1)}, 1, StatusCode::kNotFound);
      expect_refused("id twice", {make(1, 1), make(2, 1), make(1, 1)}, 99, StatusCode::kInvalidArgument);
      expect_refused("no tokens", {make(1, 1), make(2, 0)}, 1, StatusCode::kInvalidArgument);
      Obs vocab = make(2, 2);
      vocab.tokens[1] = static_cast<int32_t>(shape.vocab);
      expect_refused("token past the vocabulary", {make(1, 1), vocab}, 1, StatusCode::kInvalidArgument);
      Obs width = make(2, 2);
      width.fused.push_back(0.5f);
      expect_refused("fused width", {make(3, 1), width}, 1, StatusCode::kInvalidArgument);
      expect_refused("past the sequence's capacity", {make(1, 1), make(3, 11)}, 1, StatusCode::kResourceExhausted);
      expect_refused("too many tokens in one observe", {make(1, 1), make(3, 51)}, 1, StatusCode::kInvalidArgument);
      expect_refused("too many tokens over the batch", {make(1, 25), make(2, 25), make(3, 5)}, 99,
                     StatusCode::kInvalidArgument);
      // Sequence 1 alone may double to 512 rows (its entry is reserved first), not 2 after it as well.
      const std::vector<Obs> grow = {make(1, 7), make(2, 7)};
      expect_refused("past --max-cache-bytes", grow, 99, StatusCode::kResourceExhausted);
      uint64_t failed = 0;
      EXPECT_EQ(session.ObserveBatch(entries(grow), &failed).code(), StatusCode::kResourceExhausted);
      EXPECT_EQ(failed, 2u);
      EXPECT_EQ(session.ObserveBatch({}).code(), StatusCode::kInvalidArgument);
      EXPECT_EQ(totals.cache_bytes.load(), bytes);

      // Nothing changed: the same steps on both sessions give the same Selections.
      for (int step = 0; step < 3; ++step) {
        both({make(2, 1), make(3, 1), make(1, 1)});
        ExpectSameSelection(ref.Select({1, 2, 3}, 16, 1), session.Select({1, 2, 3}, 16, 1));
        ExpectSameSelection(ref.Select({3, 1}, 300, 4), session.Select({3, 1}, 300, 4));
      }
      EXPECT_EQ(ref_totals.cache_bytes.load(), totals.cache_bytes.load());
    }
  }
}

// Sessions on several threads share one runner (one backend): no races, no deadlock at teardown, and
// everything is freed.
TEST(RetrieverSessionCpuBackend, SessionsOnThreadsShareOneRunner) {
  std::mt19937 rng(FreshSeed());
  auto rh = testing_sparse::MakeRandomHead(HeadShape(), rng);
  ASSERT_TRUE(rh.ok()) << rh.status();
  auto runner = HeadRunner::Create(*rh->head, MakeCpuBackend());
  ASSERT_TRUE(runner.ok()) << runner.status();
  RetrieverTotals totals;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 r(1000 + t);
      RetrieverSession session(rh->head.get(), {}, &totals, runner->get());
      for (int round = 0; round < 20; ++round) {
        const uint64_t id = round % 3;
        if (round >= 3) failures += !session.Close(id).ok();
        failures += !session.Open(id, 400).ok();
        std::vector<int32_t> ids(1 + r() % 60);
        for (int32_t& x : ids) x = static_cast<int32_t>(r() % 97);
        failures += !session.Observe(id, ids, {}).ok();
        if (round >= 2) {
          auto sel = session.Select({0, 1, 2}, 8);
          failures += !sel.ok() || !ValidateIndexSets(sel->sets).ok();
        }
      }
      // The session is destroyed with its sequences open.
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(totals.sessions.load(), 0);
  EXPECT_EQ(totals.sequences.load(), 0);
  EXPECT_EQ(totals.cache_bytes.load(), 0);
}

// The CUDA backend (as `--backend cuda` makes it) against the host path: bf16 caches and queries, so sets
// are compared by overlap (near-ties in bf16 flip).
TEST(RetrieverSessionCudaBackend, SelectionsOverlapTheHostPath) {
  auto probe = MakeBackend("cuda", 0);
  if (!probe.ok()) GTEST_SKIP() << "no CUDA backend here: " << probe.status();
  probe->reset();
  for (const auto& [shape, max_prompt] : Shapes()) {
    for (SelectionMode mode : {SelectionMode::kHeadLevel, SelectionMode::kBatchLevel}) {
      auto b = MakeBackend("cuda", 0);
      ASSERT_TRUE(b.ok()) << b.status();
      RunAgainstHostPath(*std::move(b), shape, max_prompt, mode, 0.0, 2e-2, 0.99, FreshSeed(), false);
    }
  }
}

}  // namespace
}  // namespace specontext
