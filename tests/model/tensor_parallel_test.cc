// Tensor parallelism on the CPU backend (core/model/transformer.h TensorParallel): one thread per rank, each
// with its own backend and model shard, joined by an in-process communicator. Prefill and 16 greedy decode
// steps give the logits of the unsharded model within f32 tolerance and the same tokens, for TP = 2 and 4
// where the KV heads allow, on the tiny HF checkpoints and random ones (GQA, MHA, biases, qk-norm, a
// stories260K-shaped GQA model); every rank computes bit-identical logits. Splits the model does not allow
// are refused with InvalidArgument. Sparse decoding under TP: tests/sparse_engine/tensor_parallel_sparse_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/model/transformer.h"
#include "tests/model/random_model.h"

namespace specontext {
namespace {

using testing::RandomCheckpoint;
using testing::TinyConfig;

constexpr int kDecodeSteps = 16;

std::vector<int32_t> Prompt(int n, int64_t vocab) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<int32_t>((7 * i * i + 3 * i + 1) % vocab));
  return out;
}

int32_t Greedy(const float* logits, int64_t vocab) {
  return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
}

// The logits of the prefill's last token and of every decode step ([1 + kDecodeSteps][vocab]) and the
// greedy tokens, for one rank.
struct Trace {
  std::vector<std::vector<float>> logits;
  std::vector<int32_t> tokens;
};

// Loads the rank's shard on its own CPU backend and runs prefill + greedy decode.
absl::StatusOr<Trace> RunRank(const Checkpoint& ck, const TensorParallel& tp) {
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  auto model = Transformer::Load(ck, backend.get(), {}, tp);
  if (!model.ok()) return model.status();
  const int64_t vocab = (*model)->config().vocab_size;
  const std::vector<int32_t> prompt = Prompt(11, vocab);
  auto kv = (*model)->AllocateKv(static_cast<int32_t>(prompt.size()) + kDecodeSteps + 1);
  if (!kv.ok()) return kv.status();
  Trace trace;
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  std::vector<int32_t> next = prompt;
  int32_t past = 0;
  for (int step = 0; step <= kDecodeSteps; ++step) {
    ForwardSeq s{next, past, kv->get()};
    if (absl::Status st = (*model)->Forward({&s, 1}, false, &logits); !st.ok()) return st;
    past += static_cast<int32_t>(next.size());
    trace.logits.emplace_back(logits.as<float>(), logits.as<float>() + vocab);
    trace.tokens.push_back(Greedy(logits.as<float>(), vocab));
    next = {trace.tokens.back()};
  }
  return trace;
}

// One thread per rank; a rank that fails aborts the group so that the others return instead of waiting.
std::vector<absl::StatusOr<Trace>> RunTensorParallel(const Checkpoint& ck, int size) {
  auto comms = CreateInProcessGroup(size);
  std::vector<absl::StatusOr<Trace>> out(size, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      out[r] = RunRank(ck, {r, size, comms[r].get()});
      if (!out[r].ok()) comms[r]->Abort();
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

void ExpectMatchesUnsharded(const Checkpoint& ck, int size) {
  absl::StatusOr<Trace> ref = RunRank(ck, {});
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto ranks = RunTensorParallel(ck, size);
  for (int r = 0; r < size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  const Trace& tp = *ranks[0];
  ASSERT_EQ(tp.tokens, ref->tokens) << "TP " << size << " greedy tokens differ";
  float max_rel = 0;
  for (size_t step = 0; step < ref->logits.size(); ++step) {
    const std::vector<float>& want = ref->logits[step];
    const std::vector<float>& got = tp.logits[step];
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << "step " << step << " logit " << i;
      const float err = std::fabs(got[i] - want[i]) / (1 + std::fabs(want[i]));
      max_rel = std::max(max_rel, err);
      ASSERT_LE(err, 1e-4f) << "TP " << size << " step " << step << " logit " << i << ": " << got[i] << " vs "
                            << want[i];
    }
    for (int r = 1; r < size; ++r) {
      ASSERT_EQ(ranks[r]->logits[step], got) << "rank " << r << " computed other logits at step " << step;
    }
  }
  ::testing::Test::RecordProperty("max_relative_error", std::to_string(max_rel));
}

class TinyCheckpoints : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(TinyCheckpoints, MatchUnsharded) {
  const auto& [name, size] = GetParam();
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(std::string(SPECONTEXT_TEST_DATA "/tiny/") + name);
  ASSERT_TRUE(ck.ok()) << ck.status();
  ExpectMatchesUnsharded(*ck, size);
}

INSTANTIATE_TEST_SUITE_P(Tp, TinyCheckpoints,
                         ::testing::Values(std::make_tuple("tiny-llama-tied-gqa", 2), std::make_tuple("tiny-llama", 2),
                                           std::make_tuple("tiny-llama", 4), std::make_tuple("tiny-llama-bias", 2),
                                           std::make_tuple("tiny-qwen2", 2), std::make_tuple("tiny-qwen3", 2)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_tp" + std::to_string(std::get<1>(info.param));
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// stories260K's shape (llama2.c): dim 64, 5 layers, 8 heads, 4 KV heads, hidden 172 (divisible by 4), vocab 512.
ModelConfig Stories260kShape() {
  ModelConfig c = TinyConfig();
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_hidden_layers = 5;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 8;
  c.max_position_embeddings = 512;
  return c;
}

TEST(TensorParallel, Stories260kShapedGqa) {
  for (int size : {2, 4}) {
    SCOPED_TRACE(size);
    ExpectMatchesUnsharded(RandomCheckpoint(Stories260kShape(), 5), size);
  }
}

TEST(TensorParallel, RandomFamilies) {
  ModelConfig mha = TinyConfig(Architecture::kLlama, 4);
  ExpectMatchesUnsharded(RandomCheckpoint(mha, 1), 4);
  ModelConfig qwen2 = TinyConfig(Architecture::kQwen2, 2);  // q/k/v biases sliced with their rows
  ExpectMatchesUnsharded(RandomCheckpoint(qwen2, 2), 2);
  ModelConfig qwen3 = TinyConfig(Architecture::kQwen3, 2);  // per-head q/k norms
  ExpectMatchesUnsharded(RandomCheckpoint(qwen3, 3), 2);
  ModelConfig biased = TinyConfig(Architecture::kLlama, 4);  // o/down biases added once (rank 0)
  biased.o_proj_bias = true;
  biased.mlp_bias = true;
  ExpectMatchesUnsharded(RandomCheckpoint(biased, 4), 4);
}

TEST(TensorParallel, RaggedBatchMatchesUnsharded) {
  // Two sequences of different lengths in one forward, every token's logits.
  const Checkpoint ck = RandomCheckpoint(Stories260kShape(), 9);
  const std::vector<std::vector<int32_t>> prompts = {Prompt(13, 512), Prompt(5, 512)};
  auto run = [&](const TensorParallel& tp) -> absl::StatusOr<std::vector<float>> {
    std::unique_ptr<Backend> backend = MakeCpuBackend();
    auto model = Transformer::Load(ck, backend.get(), {}, tp);
    if (!model.ok()) return model.status();
    std::vector<std::unique_ptr<SequenceKv>> kvs;
    std::vector<ForwardSeq> seqs;
    for (const auto& p : prompts) {
      kvs.push_back((*model)->AllocateKv(32).value());
      seqs.push_back({p, 0, kvs.back().get()});
    }
    Tensor logits = Tensor::HostEmpty(DType::kF32, {18, 512});
    if (absl::Status st = (*model)->Forward(seqs, true, &logits); !st.ok()) return st;
    return std::vector<float>(logits.as<float>(), logits.as<float>() + logits.numel());
  };
  auto ref = run({});
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto comms = CreateInProcessGroup(4);
  std::vector<absl::StatusOr<std::vector<float>>> got(4, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      got[r] = run({r, 4, comms[r].get()});
      if (!got[r].ok()) comms[r]->Abort();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 4; ++r) ASSERT_TRUE(got[r].ok()) << got[r].status();
  for (size_t i = 0; i < ref->size(); ++i) {
    ASSERT_LE(std::fabs((*got[0])[i] - (*ref)[i]), 1e-4f * (1 + std::fabs((*ref)[i]))) << "logit " << i;
  }
}

TEST(TensorParallel, RefusesSplitsTheModelDoesNotAllow) {
  const Checkpoint ck = RandomCheckpoint(TinyConfig(Architecture::kLlama, 4), 1);
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  auto three = CreateInProcessGroup(3);  // 3 does not divide 4 KV heads
  auto model = Transformer::Load(ck, backend.get(), {}, {0, 3, three[0].get()});
  ASSERT_TRUE(absl::IsInvalidArgument(model.status())) << model.status();
  EXPECT_NE(model.status().message().find("KV heads"), std::string::npos) << model.status();
  auto eight = CreateInProcessGroup(8);  // more ranks than KV heads
  model = Transformer::Load(ck, backend.get(), {}, {0, 8, eight[0].get()});
  EXPECT_TRUE(absl::IsInvalidArgument(model.status())) << model.status();
  model = Transformer::Load(ck, backend.get(), {}, {0, 2, nullptr});  // no communicator
  EXPECT_TRUE(absl::IsInvalidArgument(model.status())) << model.status();
  model = Transformer::Load(ck, backend.get(), {}, {2, 2, three[2].get()});  // rank out of range
  EXPECT_TRUE(absl::IsInvalidArgument(model.status())) << model.status();
}

}  // namespace
}  // namespace specontext
