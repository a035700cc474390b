// The model's KV-cache paths agree with one another: chunked prefill, token-by-token decode and
// ragged batches give the logits of a single full forward.
#include <gtest/gtest.h>

#include <cmath>

#include "core/model/transformer.h"
#include "tests/model/random_model.h"

namespace specontext {
namespace {

using testing::RandomCheckpoint;
using testing::TinyConfig;

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int32_t> out(n);
  for (int32_t& t : out) t = d(rng);
  return out;
}

void ExpectClose(const float* a, const float* b, int64_t n, float tol) {
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(a[i]) && std::isfinite(b[i])) << "at " << i;
    ASSERT_NEAR(a[i], b[i], tol * (1 + std::fabs(b[i]))) << "at " << i;
  }
}

struct Fixture {
  explicit Fixture(const ModelConfig& c, uint32_t seed = 7) : backend(MakeCpuBackend()) {
    Checkpoint ck = RandomCheckpoint(c, seed);
    model = std::move(Transformer::Load(ck, backend.get())).value();
  }
  Tensor FullLogits(const std::vector<int32_t>& tokens) {
    auto kv = model->AllocateKv(static_cast<int32_t>(tokens.size())).value();
    const int64_t v = model->config().vocab_size;
    Tensor logits = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(tokens.size()), v});
    ForwardSeq s{tokens, 0, kv.get()};
    EXPECT_TRUE(model->Forward({&s, 1}, true, &logits).ok());
    return logits;
  }
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
};

class TransformerFamilies : public ::testing::TestWithParam<std::tuple<Architecture, int>> {};

TEST_P(TransformerFamilies, IncrementalDecodeMatchesFullForward) {
  const auto [arch, kv_heads] = GetParam();
  Fixture f(TinyConfig(arch, kv_heads));
  const int64_t v = f.model->config().vocab_size;
  const auto tokens = RandomTokens(29, static_cast<int>(v), 3);
  Tensor full = f.FullLogits(tokens);

  // Prefill 11 tokens in chunks of 4, 4, 3, then decode one token at a time.
  auto kv = f.model->AllocateKv(40).value();
  int32_t past = 0;
  for (int chunk : {4, 4, 3}) {
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, v});
    ForwardSeq s{std::span<const int32_t>(tokens.data() + past, chunk), past, kv.get()};
    ASSERT_TRUE(f.model->Forward({&s, 1}, false, &logits).ok());
    past += chunk;
    ExpectClose(logits.as<float>(), full.as<float>() + (past - 1) * v, v, 1e-4f);
  }
  for (; past < static_cast<int32_t>(tokens.size()); ++past) {
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, v});
    ForwardSeq s{std::span<const int32_t>(tokens.data() + past, 1), past, kv.get()};
    ASSERT_TRUE(f.model->Forward({&s, 1}, false, &logits).ok());
    ExpectClose(logits.as<float>(), full.as<float>() + past * v, v, 1e-4f);
  }
}

INSTANTIATE_TEST_SUITE_P(All, TransformerFamilies,
                         ::testing::Values(std::make_tuple(Architecture::kLlama, 4),   // MHA
                                           std::make_tuple(Architecture::kLlama, 2),   // GQA
                                           std::make_tuple(Architecture::kLlama, 1),   // MQA
                                           std::make_tuple(Architecture::kQwen2, 2),   // QKV bias
                                           std::make_tuple(Architecture::kQwen3, 2)));  // QK norm

TEST(Transformer, RaggedBatchMatchesSingleSequences) {
  Fixture f(TinyConfig());
  const int64_t v = f.model->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts = {RandomTokens(5, v, 1), RandomTokens(17, v, 2),
                                               RandomTokens(1, v, 3)};
  std::vector<Tensor> expected;
  for (const auto& p : prompts) expected.push_back(f.FullLogits(p));

  // Step 1: prefill all but the last token of each prompt together; step 2: decode the last tokens.
  std::vector<std::unique_ptr<SequenceKv>> kvs;
  std::vector<ForwardSeq> step1, step2;
  for (const auto& p : prompts) kvs.push_back(f.model->AllocateKv(32).value());
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].size() > 1) {
      step1.push_back({std::span<const int32_t>(prompts[i].data(), prompts[i].size() - 1), 0, kvs[i].get()});
    }
  }
  Tensor l1 = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(step1.size()), v});
  ASSERT_TRUE(f.model->Forward(step1, false, &l1).ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int32_t past = static_cast<int32_t>(prompts[i].size()) - 1;
    step2.push_back({std::span<const int32_t>(prompts[i].data() + past, 1), past, kvs[i].get()});
  }
  Tensor l2 = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(step2.size()), v});
  ASSERT_TRUE(f.model->Forward(step2, false, &l2).ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t last = static_cast<int64_t>(prompts[i].size()) - 1;
    ExpectClose(l2.as<float>() + i * v, expected[i].as<float>() + last * v, v, 1e-4f);
  }
}

TEST(Transformer, RejectsBadInput) {
  Fixture f(TinyConfig());
  const int64_t v = f.model->config().vocab_size;
  auto kv = f.model->AllocateKv(4).value();
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, v});
  std::vector<int32_t> bad = {0, static_cast<int32_t>(v)};
  ForwardSeq s{bad, 0, kv.get()};
  EXPECT_EQ(f.model->Forward({&s, 1}, false, &logits).code(), absl::StatusCode::kOutOfRange);
  std::vector<int32_t> too_long(5, 1);
  ForwardSeq s2{too_long, 0, kv.get()};
  EXPECT_EQ(f.model->Forward({&s2, 1}, false, &logits).code(), absl::StatusCode::kOutOfRange);
  EXPECT_FALSE(f.model->AllocateKv(0).ok());
}

TEST(Transformer, MemoryLimitIsHonoured) {
  auto backend = MakeCpuBackend(/*memory_limit=*/64 << 10);
  Checkpoint ck = RandomCheckpoint(TinyConfig(), 1);
  auto model = Transformer::Load(ck, backend.get());
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace specontext
