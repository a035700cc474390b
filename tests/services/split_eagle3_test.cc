// Split mode with an EAGLE-3 retrieval head, and batch-level selection in split mode: a RemoteSparseDecoder
// talking to a Retriever service (gRPC on loopback, in this process) decodes exactly as the in-process
// SparseDecoder with the same head: the generator streams the target's hidden states at the head's fusion
// layers with every observed token (prompt chunks split into several Observe messages by a small size
// limit), the retriever's selections equal in-process selection, so the logits of every step agree. Layers
// 2.. are offloaded and B < length, so the index sets decide the outputs. Tiny random checkpoint (3 layers,
// GQA 8/2), CPU.
#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "core/model/sparse_decoder.h"
#include "generator/remote_sparse_decoder.h"
#include "retriever/retriever_service.h"
#include "tests/services/in_process_retriever.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

std::string WriteEagle3Head(const ModelConfig& target, uint32_t seed) {
  return WriteRandomEagle3Head(target, seed, absl::StrCat("split_eagle3_", seed), 0.5f, 0.5f);
}

struct Mode {
  bool eagle3;
  bool batch_level;
};

class SplitMatchesInproc : public ::testing::TestWithParam<Mode> {};

TEST_P(SplitMatchesInproc, SameLogitsEveryStep) {
  const Mode mode = GetParam();
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  auto tiny = LoadTiny(13);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Tiny& t = **tiny;
  const ModelConfig& c = t.checkpoint.config;
  const std::string head_dir = mode.eagle3 ? WriteEagle3Head(c, seed) : TinyFiles(13)->second;
  auto head = RetrievalHead::Load(head_dir, c, t.checkpoint.weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  ASSERT_EQ((*head)->fused_width() > 0, mode.eagle3);
  auto ret = StartRetriever(head->get(), head_dir);
  ASSERT_NE(ret, nullptr);

  constexpr int32_t kBudget = 5, kCap = 96, kGpuLayers = 2;
  SparseOptions so;
  so.budget = kBudget;
  so.sink = 1;
  so.mode = mode.batch_level ? SelectionMode::kBatchLevel : SelectionMode::kHeadLevel;
  auto inproc = SparseDecoder::Create(t.model.get(), head->get(), so);
  ASSERT_TRUE(inproc.ok()) << inproc.status();
  generator::RemoteSparseOptions ro;
  ro.address = absl::StrCat("127.0.0.1:", ret->port);
  ro.budget = kBudget;
  ro.sink = 1;
  ro.batch_level = mode.batch_level;
  ro.step_deadline = absl::Seconds(10);
  ro.observe_message_bytes = 3 * 4 * static_cast<size_t>(3 * c.hidden_size);  // 3 tokens per Observe
  auto split = generator::RemoteSparseDecoder::Create(t.model.get(), ro);
  ASSERT_TRUE(split.ok()) << split.status();
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!(*split)->path_stats().connected && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE((*split)->path_stats().connected);
  ASSERT_TRUE((*inproc)->OffloadLayers(kGpuLayers).ok());
  ASSERT_TRUE((*split)->OffloadLayers(kGpuLayers).ok());
  auto kv_in = (*inproc)->AllocateKv(1, kCap, kBudget);
  auto kv_sp = (*split)->AllocateKv(1, kCap, kBudget);
  ASSERT_TRUE(kv_in.ok() && kv_sp.ok());

  // A prompt in two chunks (the second carries the first's last features), then greedy decode steps; both
  // decoders get the in-process decoder's tokens so that their sequences stay identical.
  std::vector<int32_t> tokens = RandomPrompt(14, c.vocab_size, seed);
  const std::vector<size_t> chunks = {6, 14};
  size_t cached = 0;
  const SparseStepSeq step{1, kBudget};
  int steps = 0, past_budget = 0;
  for (int i = 0; i < 24; ++i, ++steps) {
    const size_t end = i < 2 ? chunks[i] : tokens.size();
    std::span<const int32_t> fresh(tokens.data() + cached, end - cached);
    Tensor a = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size}), b = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    ForwardSeq fa{fresh, static_cast<int32_t>(cached), kv_in->get()};
    ForwardSeq fb{fresh, static_cast<int32_t>(cached), kv_sp->get()};
    ASSERT_TRUE((*inproc)->Forward({&fa, 1}, {&step, 1}, &a).ok());
    ASSERT_TRUE((*split)->Forward({&fb, 1}, {&step, 1}, &b).ok());
    if (fresh.size() == 1 && cached > static_cast<size_t>(kBudget)) ++past_budget;
    cached = end;
    double max_diff = 0;
    for (int64_t v = 0; v < c.vocab_size; ++v) {
      max_diff = std::max<double>(max_diff, std::fabs(a.as<float>()[v] - b.as<float>()[v]));
    }
    // Same index sets -> the same computation; only the two heads' float rounding may differ.
    ASSERT_LT(max_diff, 1e-4) << "step " << i << " (" << fresh.size() << " new tokens at " << fa.past_len << ")";
    if (i >= 1) {
      const float* lg = a.as<float>();
      tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + c.vocab_size) - lg));
    }
  }
  ASSERT_GT(past_budget, 10);
  EXPECT_EQ((*split)->path_stats().fallback_steps, 0);
  EXPECT_EQ((*split)->path_stats().remote_steps, past_budget);
  EXPECT_EQ((*split)->stats().sparse_steps, (*inproc)->stats().sparse_steps);
  const std::vector<int32_t> sets_per_seq = {(*inproc)->last_sets().sets_per_seq};
  EXPECT_EQ(sets_per_seq[0], mode.batch_level ? 1 : c.num_key_value_heads);
  (*split)->Release(1);
  (*inproc)->Release(1);
}

INSTANTIATE_TEST_SUITE_P(Modes, SplitMatchesInproc,
                         ::testing::Values(Mode{true, false}, Mode{true, true}, Mode{false, true}),
                         [](const auto& info) {
                           return std::string(info.param.eagle3 ? "Eagle3" : "Layer") +
                                  (info.param.batch_level ? "BatchLevel" : "HeadLevel");
                         });

// The wire formats of Observe's features: f32 `hidden`, packed f32 or bf16 `features`, and their errors.
TEST(ObserveFeatures, WireFormats) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> d(-3, 3);
  std::vector<float> rows(2 * 5 + rng() % 7);
  for (float& x : rows) x = d(rng);
  v1::Observe o;
  o.mutable_hidden()->Add(rows.begin(), rows.end());
  auto got = retriever::FeaturesFromProto(o);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, rows);
  o.clear_hidden();
  o.set_features(reinterpret_cast<const char*>(rows.data()), rows.size() * 4);
  o.set_features_dtype(v1::FEATURE_DTYPE_F32);
  got = retriever::FeaturesFromProto(o);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, rows);
  std::string packed;
  for (float x : rows) {
    const uint16_t v = F32ToBf16(x);
    packed.push_back(static_cast<char>(v & 0xff));
    packed.push_back(static_cast<char>(v >> 8));
  }
  o.set_features(packed);
  o.set_features_dtype(v1::FEATURE_DTYPE_BF16);
  got = retriever::FeaturesFromProto(o);
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(got->size(), rows.size());
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ((*got)[i], Bf16ToF32(F32ToBf16(rows[i]))) << i;
  v1::Observe bad = o;
  bad.set_features(packed.substr(1));
  EXPECT_EQ(retriever::FeaturesFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.add_hidden(1.0f);
  EXPECT_EQ(retriever::FeaturesFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.set_features_dtype(static_cast<v1::FeatureDType>(7));
  EXPECT_EQ(retriever::FeaturesFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.set_features_dtype(v1::FEATURE_DTYPE_F32);
  bad.set_features(std::string(reinterpret_cast<const char*>(rows.data()), rows.size() * 4 - 2));
  EXPECT_EQ(retriever::FeaturesFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace specontext::testing
