// Tensor parallelism on the CPU backend (core/model/transformer.h TensorParallel): one thread per rank, each
// with its own backend and model shard, joined by an in-process communicator. Prefill and 16 greedy decode
// steps give the logits of the unsharded model within f32 tolerance and the same tokens, for TP = 2 and 4
// where the KV heads allow, on the tiny HF checkpoints and random ones (GQA, MHA, biases, qk-norm, a
// stories260K-shaped GQA model); every rank computes bit-identical logits. Splits the model does not allow
// are refused with InvalidArgument. Sparse decoding under TP: tests/sparse_engine/tensor_parallel_sparse_test.cc;
// the same runs on the CUDA backend: tests/cuda/cuda_tensor_parallel_test.cc (tests/model/tensor_parallel_harness.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/model/transformer.h"
#include "tests/model/tensor_parallel_harness.h"

namespace specontext {
namespace {

using testing::RandomCheckpoint;
using testing::Stories260kShape;
using testing::TinyConfig;
using testing::TpPrompt;
using testing::TpTrace;

// One CPU backend per rank joined by the in-process group (tests/model/tensor_parallel_harness.h runs them).
std::vector<absl::StatusOr<TpTrace>> RunTensorParallel(const Checkpoint& ck, int size) {
  std::vector<std::unique_ptr<Backend>> owned;
  std::vector<Backend*> backends;
  for (int r = 0; r < size; ++r) {
    owned.push_back(MakeCpuBackend());
    backends.push_back(owned.back().get());
  }
  return testing::RunTpRanks(ck, backends, CreateInProcessGroup(size));
}

absl::StatusOr<TpTrace> RunUnsharded(const Checkpoint& ck) {
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  return testing::RunTpRank(ck, backend.get(), {});
}

void ExpectMatchesUnsharded(const Checkpoint& ck, int size) {
  absl::StatusOr<TpTrace> ref = RunUnsharded(ck);
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto ranks = RunTensorParallel(ck, size);
  for (int r = 0; r < size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  const TpTrace& tp = *ranks[0];
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
  const std::vector<std::vector<int32_t>> prompts = {TpPrompt(13, 512), TpPrompt(5, 512)};
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
