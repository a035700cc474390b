// Batch invariance through the Transformer, for any backend (the CUDA and CPU tests of the batch-invariant
// mode share it): a prompt decoded greedily alone, then inside batches of other sequences of other lengths
// (prefilled in the same step as the prompt), optionally while a long prompt is prefilled chunk by chunk in
// the same steps as the decoding. Each run records the prompt's logits row at every step (the prefill step
// first); batched runs are teacher-forced with the alone run's tokens so their logits stay comparable.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/transformer.h"
#include "gtest/gtest.h"

namespace specontext::testing {

struct BatchScenario {
  int others = 0;        // sequences beside the target
  bool mixed = false;    // a long prompt prefilled in chunks during decode steps 2..5
  int target_index = 0;  // the target's place in the batch
  int max_other_len = 300;
};

inline std::string ScenarioName(const BatchScenario& s) {
  return absl::StrCat(s.others, " others", s.mixed ? " + a chunked prefill" : "", ", target at ", s.target_index);
}

struct LogitsTrace {
  std::vector<std::vector<float>> logits;  // [step][vocab]: the target's row
  std::vector<int32_t> argmax;
};

// Runs `steps` decode steps after the prefill; `forced` (an earlier run's argmax tokens) drives the target
// after the prompt when non-empty, else its own argmax. The other sequences' tokens come from `seed`.
inline LogitsTrace RunBatchScenario(Transformer& model, const BatchScenario& sc, const std::vector<int32_t>& prompt,
                                    const std::vector<int32_t>& forced, int steps, uint32_t seed) {
  std::mt19937 rng(seed);
  const int32_t vocab = static_cast<int32_t>(model.config().vocab_size);
  std::uniform_int_distribution<int32_t> tok(3, vocab - 3);
  std::uniform_int_distribution<int> len(3, std::max(3, sc.max_other_len));
  const int n = sc.others + 1;
  const int target = std::min(sc.target_index, n - 1);
  std::vector<std::vector<int32_t>> tokens(n);
  std::vector<std::unique_ptr<SequenceKv>> kv(n);
  for (int i = 0; i < n; ++i) {
    if (i == target) {
      tokens[i] = prompt;
    } else {
      tokens[i].resize(len(rng));
      for (int32_t& t : tokens[i]) t = tok(rng);
    }
    auto a = model.AllocateKv(static_cast<int32_t>(tokens[i].size()) + steps + 2);
    EXPECT_TRUE(a.ok()) << a.status();
    if (!a.ok()) return {};
    kv[i] = *std::move(a);
  }
  constexpr int kChunk = 50, kChunks = 4, kMixFrom = 2;
  std::vector<int32_t> long_prompt(kChunk * kChunks);
  for (int32_t& t : long_prompt) t = tok(rng);
  auto long_kv = model.AllocateKv(kChunk * kChunks + 1);
  EXPECT_TRUE(long_kv.ok()) << long_kv.status();
  if (!long_kv.ok()) return {};

  LogitsTrace trace;
  std::vector<int> past(n, 0);
  for (int step = 0; step <= steps; ++step) {
    std::vector<ForwardSeq> seqs;
    for (int i = 0; i < n; ++i) {
      const int32_t count = step == 0 ? static_cast<int32_t>(tokens[i].size()) : 1;
      seqs.push_back({std::span<const int32_t>(tokens[i].data() + past[i], count), past[i], kv[i].get()});
    }
    const int chunk = step - kMixFrom;
    if (sc.mixed && chunk >= 0 && chunk < kChunks) {
      seqs.push_back({std::span<const int32_t>(long_prompt.data() + chunk * kChunk, kChunk), chunk * kChunk,
                      long_kv->get()});
    }
    Tensor logits = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(seqs.size()), vocab});
    const absl::Status st = model.Forward(seqs, false, &logits);
    EXPECT_TRUE(st.ok()) << ScenarioName(sc) << ", step " << step << ": " << st;
    if (!st.ok()) return trace;
    const float* row = logits.as<float>() + int64_t{target} * vocab;
    trace.logits.emplace_back(row, row + vocab);
    trace.argmax.push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
    for (int i = 0; i < n; ++i) {
      past[i] += static_cast<int>(seqs[i].tokens.size());
      if (step == steps) continue;
      int32_t next = tok(rng);
      if (i == target) next = forced.empty() ? trace.argmax.back() : forced[step];
      tokens[i].push_back(next);
    }
  }
  return trace;
}

struct TraceDiff {
  double max_abs = 0;    // largest |logit difference| over all steps
  int equal_steps = 0;   // steps whose logits row is bitwise the same
  int argmax_changes = 0;
};

inline TraceDiff Compare(const LogitsTrace& a, const LogitsTrace& b) {
  TraceDiff d;
  for (size_t step = 0; step < std::min(a.logits.size(), b.logits.size()); ++step) {
    for (size_t e = 0; e < a.logits[step].size(); ++e) {
      d.max_abs = std::max(d.max_abs, std::fabs(double(a.logits[step][e]) - b.logits[step][e]));
    }
    d.equal_steps += std::memcmp(a.logits[step].data(), b.logits[step].data(), a.logits[step].size() * 4) == 0;
    d.argmax_changes += a.argmax[step] != b.argmax[step];
  }
  return d;
}

// Expects every step of `got` to equal `alone` bit for bit, and the same greedy tokens.
inline void ExpectSameTrace(const LogitsTrace& got, const LogitsTrace& alone, const std::string& what) {
  ASSERT_EQ(got.logits.size(), alone.logits.size()) << what;
  for (size_t step = 0; step < got.logits.size(); ++step) {
    const bool same = std::memcmp(got.logits[step].data(), alone.logits[step].data(), got.logits[step].size() * 4) == 0;
    double diff = 0;
    for (size_t e = 0; e < got.logits[step].size(); ++e) {
      diff = std::max(diff, std::fabs(double(got.logits[step][e]) - alone.logits[step][e]));
    }
    EXPECT_TRUE(same) << what << ", step " << step << ": logits differ from the alone run, max |diff| " << diff;
    EXPECT_EQ(got.argmax[step], alone.argmax[step]) << what << ", step " << step;
  }
}

}  // namespace specontext::testing
