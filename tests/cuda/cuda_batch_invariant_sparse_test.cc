// Batch-invariant mode with sparse decoding on the GPU (SparseDecoder, CudaBackendOptions::batch_invariant).
//
// The tiny checkpoint of the sparse engine tests with its pruned `layer` head, budget 16: a short prompt
// decodes alone (every past position within the budget for the first steps, selected by the head after),
// then beside two longer sequences whose past exceeds the budget from the start. With the mode on its logits
// must be bitwise those of the alone run at every step: the decoder keeps a short sequence on the sparse
// kernel in both cases, and the sparse attention's chunks do not depend on the other sequences. With the
// mode off the difference is printed (alone, a step of short sequences only runs dense attention).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "core/model/sparse_decoder.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

constexpr int32_t kBudget = 16;
constexpr int kSteps = 14;

struct Loaded {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<RetrievalHead> head;
};

std::unique_ptr<Loaded> Load(bool invariant) {
  CudaBackendOptions o;
  o.batch_invariant = invariant;
  std::unique_ptr<Backend> gpu = MakeGpuOrNull(o);
  if (gpu == nullptr) return nullptr;
  auto files = TinyFiles(7);
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return nullptr;
  auto t = std::make_unique<Loaded>();
  auto ck = OpenCheckpoint(files->first);
  EXPECT_TRUE(ck.ok()) << ck.status();
  if (!ck.ok()) return nullptr;
  t->checkpoint = *std::move(ck);
  t->backend = std::move(gpu);
  auto m = Transformer::Load(t->checkpoint, t->backend.get());
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  t->model = *std::move(m);
  auto h = RetrievalHead::Load(files->second, t->checkpoint.config, t->checkpoint.weights.get());
  EXPECT_TRUE(h.ok()) << h.status();
  if (!h.ok()) return nullptr;
  t->head = *std::move(h);
  return t;
}

// The target's logits row per step (prefill first); `others` prompt lengths beside it; `forced` drives the
// target's tokens after the prompt when non-empty.
std::vector<std::vector<float>> RunSteps(Loaded& t, const std::vector<int>& others, const std::vector<int32_t>& forced,
                                    std::vector<int32_t>* argmax) {
  SparseOptions so;
  so.budget = kBudget;
  auto dec = SparseDecoder::Create(t.model.get(), t.head.get(), so);
  EXPECT_TRUE(dec.ok()) << dec.status();
  if (!dec.ok()) return {};
  const int64_t vocab = t.checkpoint.config.vocab_size;
  const int n = static_cast<int>(others.size()) + 1, target = n / 2;
  std::vector<std::vector<int32_t>> tokens(n);
  std::vector<std::unique_ptr<SequenceKv>> kv(n);
  std::vector<SparseStepSeq> seqs;
  for (int i = 0, o = 0; i < n; ++i) {
    tokens[i] = i == target ? RandomPrompt(10, vocab, 5) : RandomPrompt(others[o++], vocab, 100 + i);
    auto a = (*dec)->AllocateKv(i + 1, static_cast<int32_t>(tokens[i].size()) + kSteps + 2, kBudget);
    EXPECT_TRUE(a.ok()) << a.status();
    if (!a.ok()) return {};
    kv[i] = *std::move(a);
    seqs.push_back({static_cast<uint64_t>(i + 1), kBudget});
  }
  std::vector<std::vector<float>> rows;
  std::vector<int32_t> past(n, 0);
  for (int step = 0; step <= kSteps; ++step) {
    std::vector<ForwardSeq> fwd;
    for (int i = 0; i < n; ++i) {
      const int32_t count = step == 0 ? static_cast<int32_t>(tokens[i].size()) : 1;
      fwd.push_back({std::span<const int32_t>(tokens[i].data() + past[i], count), past[i], kv[i].get()});
    }
    Tensor logits = Tensor::HostEmpty(DType::kF32, {n, vocab});
    const absl::Status st = (*dec)->Forward(fwd, seqs, &logits);
    EXPECT_TRUE(st.ok()) << "step " << step << ": " << st;
    if (!st.ok()) return rows;
    const float* row = logits.as<float>() + int64_t{target} * vocab;
    rows.emplace_back(row, row + vocab);
    argmax->push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
    for (int i = 0; i < n; ++i) {
      past[i] += static_cast<int32_t>(fwd[i].tokens.size());
      const float* r = logits.as<float>() + int64_t{i} * vocab;
      tokens[i].push_back(i == target && !forced.empty() ? forced[step]
                                                          : static_cast<int32_t>(std::max_element(r, r + vocab) - r));
    }
  }
  return rows;
}

double MaxDiff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b, int* equal) {
  double m = 0;
  *equal = 0;
  for (size_t s = 0; s < std::min(a.size(), b.size()); ++s) {
    for (size_t e = 0; e < a[s].size(); ++e) m = std::max(m, std::fabs(double(a[s][e]) - b[s][e]));
    *equal += std::memcmp(a[s].data(), b[s].data(), a[s].size() * 4) == 0;
  }
  return m;
}

TEST(CudaBatchInvariantSparse, AShortSequenceGivesItsAloneLogitsBesideLongOnes) {
  std::unique_ptr<Loaded> t = Load(true);
  if (t == nullptr) GTEST_SKIP() << "no CUDA device (or the tiny checkpoint failed, see above)";
  std::vector<int32_t> alone_argmax, batched_argmax;
  const auto alone = RunSteps(*t, {}, {}, &alone_argmax);
  ASSERT_EQ(alone.size(), size_t{kSteps + 1});
  const auto batched = RunSteps(*t, {53, 38}, alone_argmax, &batched_argmax);
  ASSERT_EQ(batched.size(), alone.size());
  for (size_t s = 0; s < alone.size(); ++s) {
    EXPECT_EQ(std::memcmp(alone[s].data(), batched[s].data(), alone[s].size() * 4), 0) << "step " << s;
    EXPECT_EQ(alone_argmax[s], batched_argmax[s]) << "step " << s;
  }
}

TEST(CudaBatchInvariantSparse, BatchDependenceWithTheModeOffIsOnlyReported) {
  std::unique_ptr<Loaded> t = Load(false);
  if (t == nullptr) GTEST_SKIP() << "no CUDA device (or the tiny checkpoint failed, see above)";
  std::vector<int32_t> alone_argmax, batched_argmax;
  const auto alone = RunSteps(*t, {}, {}, &alone_argmax);
  const auto batched = RunSteps(*t, {53, 38}, alone_argmax, &batched_argmax);
  int equal = 0;
  const double diff = MaxDiff(alone, batched, &equal);
  std::printf("[ info ] mode off, sparse B %d: short sequence beside two long ones: max |logit diff| %g, bitwise-equal "
              "steps %d/%zu\n", kBudget, diff, equal, alone.size());
}

}  // namespace
}  // namespace specontext::testing
