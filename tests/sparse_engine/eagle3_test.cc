// The EAGLE-3 retrieval head in the engine: the target's hidden states at the fusion layers, captured
// step by step during prefill and sparse decode, feed the head exactly as a one-shot dense forward would.
#include <gtest/gtest.h>

#include <random>

#include "core/model/sparse_decoder.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

std::string WriteEagle3Head(const ModelConfig& target, uint32_t seed) {
  return testing::WriteRandomEagle3Head(target, seed, absl::StrCat("eagle3_", seed));
}

TEST(SparseEagle3, CapturedHiddenStatesFeedTheHeadLikeAOneShotForward) {
  auto tiny = testing::LoadTiny();
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  testing::Tiny& t = **tiny;
  const ModelConfig& c = t.checkpoint.config;
  auto head = RetrievalHead::Load(WriteEagle3Head(c, 31), c, t.checkpoint.weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  ASSERT_GT((*head)->fused_width(), 0);
  SparseOptions o;
  o.budget = 64;  // >= the length: sparse attention over slot buffers is exact, so hidden states agree
  auto dec = SparseDecoder::Create(t.model.get(), head->get(), o);
  ASSERT_TRUE(dec.ok()) << dec.status();
  ASSERT_TRUE((*dec)->OffloadLayers(1).ok());
  auto kv = (*dec)->AllocateKv(1, 64, 64);
  ASSERT_TRUE(kv.ok());
  std::vector<int32_t> tokens = testing::RandomPrompt(9, c.vocab_size, 3);
  int32_t cached = 0;
  {
    // The prompt in two chunks: the second chunk's first token pairs with the first chunk's last features.
    ForwardSeq f{std::span<const int32_t>(tokens.data(), 5), 0, kv->get()};
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    ASSERT_TRUE((*dec)->Forward({&f, 1}, std::vector<SparseStepSeq>{{1, 64}}, &logits).ok());
    cached = 5;
  }
  for (int step = 0; step < 12; ++step) {
    ForwardSeq f{std::span<const int32_t>(tokens.data() + cached, tokens.size() - cached), cached, kv->get()};
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    ASSERT_TRUE((*dec)->Forward({&f, 1}, std::vector<SparseStepSeq>{{1, 64}}, &logits).ok());
    cached = static_cast<int32_t>(tokens.size());
    const float* lg = logits.as<float>();
    tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + c.vocab_size) - lg));
  }
  EXPECT_GT((*dec)->stats().sparse_steps, 0);
  tokens.pop_back();  // the last sampled token was never observed
  const int64_t n = static_cast<int64_t>(tokens.size());

  // Reference: one dense forward of the whole sequence capturing the fusion layers, then the head's forward
  // with token t paired with the features of position t-1.
  auto ref_kv = t.model->AllocateKv(64);
  ASSERT_TRUE(ref_kv.ok());
  HiddenCapture cap;
  for (int64_t l : (*head)->config().fusion_layers) cap.layers.push_back(static_cast<int32_t>(l));
  ForwardSeq f{tokens, 0, ref_kv->get()};
  Tensor all = Tensor::HostEmpty(DType::kF32, {n, c.vocab_size});
  ASSERT_TRUE(t.model->Forward({&f, 1}, /*all_tokens=*/true, &all, nullptr, &cap).ok());
  const int64_t fw = (*head)->fused_width();
  Tensor fused = Tensor::HostEmpty(DType::kF32, {n, fw});
  for (int64_t i = 1; i < n; ++i) {
    std::copy_n(cap.out.as<float>() + (i - 1) * fw, fw, fused.as<float>() + i * fw);
  }
  std::vector<int32_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(i);
  Tensor q = Tensor::HostEmpty(DType::kF32, {n, (*head)->n_heads(), (*head)->head_dim()});
  Tensor k = Tensor::HostEmpty(DType::kF32, {n, (*head)->n_kv_heads(), (*head)->head_dim()});
  ASSERT_TRUE((*head)->Forward(tokens, pos, fused, &q, &k).ok());
  const Tensor* cache = (*dec)->retrieval_cache(1);
  ASSERT_NE(cache, nullptr);
  ASSERT_EQ((*dec)->retrieval_len(1), n);
  Tensor cached_k = Tensor::HostEmpty(cache->dtype(), cache->shape());
  ASSERT_TRUE(t.backend->ToHost(*cache, &cached_k).ok());
  ASSERT_EQ(cached_k.dtype(), DType::kF32);
  const int64_t nkv = (*head)->n_kv_heads(), hd = (*head)->head_dim(), cap_rows = cached_k.dim(1);
  double max_diff = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < nkv; ++g) {
      for (int64_t e = 0; e < hd; ++e) {
        const float got = cached_k.as<float>()[(g * cap_rows + i) * hd + e];
        const float want = k.as<float>()[(i * nkv + g) * hd + e];
        max_diff = std::max(max_diff, static_cast<double>(std::abs(got - want)));
        ASSERT_NEAR(got, want, 1e-4 + 1e-4 * std::abs(want)) << "token " << i << " head " << g;
      }
    }
  }
}

}  // namespace
}  // namespace specontext
