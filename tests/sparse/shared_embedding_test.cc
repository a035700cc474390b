// A retrieval head whose config says it shares the target's embedding ("embedding": "target", the EAGLE-3
// heads) must read the model's table on the backend: SparseDecoder::Create uploads no second copy (1 GB for
// an 8B target). A head with its own embedding (the pruned `layer` head) still uploads its table: the
// control that shows the measurement can see an embedding-sized block.
#include <gtest/gtest.h>

#include <random>

#include "core/model/sparse_decoder.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext {
namespace {

std::string WriteSharedEagle3Head(const ModelConfig& target, uint32_t seed) {
  return testing::WriteRandomEagle3Head(target, seed, absl::StrCat("shared_eagle3_", seed));
}

int64_t RetrievalBytes(const Backend& b) {
  return b.memory_report().bytes[static_cast<size_t>(MemoryKind::kRetrieval)];
}

TEST(SharedEmbedding, HeadSharingTheTargetsEmbeddingUploadsNoCopy) {
  auto tiny = testing::LoadTiny();
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  testing::Tiny& t = **tiny;
  const ModelConfig& c = t.checkpoint.config;
  const int64_t embed_bytes = static_cast<int64_t>(t.model->embedding().nbytes());
  ASSERT_EQ(t.model->embedding().shape(), (Shape{c.vocab_size, c.hidden_size}));

  // Control: the layer head has its own embedding and uploads it.
  ASSERT_TRUE(t.head->config().own_embedding);
  const int64_t before_own = RetrievalBytes(*t.backend);
  auto own = SparseDecoder::Create(t.model.get(), t.head.get(), SparseOptions{});
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_GE(RetrievalBytes(*t.backend) - before_own, embed_bytes);
  EXPECT_GE((*own)->device_head().weight_bytes(), embed_bytes);

  auto head = RetrievalHead::Load(WriteSharedEagle3Head(c, 17), c, t.checkpoint.weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  ASSERT_FALSE((*head)->config().own_embedding);
  const int64_t before = RetrievalBytes(*t.backend);
  auto dec = SparseDecoder::Create(t.model.get(), head->get(), SparseOptions{});
  ASSERT_TRUE(dec.ok()) << dec.status();
  const int64_t added = RetrievalBytes(*t.backend) - before;
  EXPECT_LT(added, embed_bytes) << "the head's device weights include an embedding-sized block";
  EXPECT_GE(added, (*dec)->device_head().weight_bytes());  // (the CPU accounting rounds allocations up)
  EXPECT_LT((*dec)->device_head().weight_bytes(), embed_bytes);

  // The decoder still runs with the shared table: a prompt and a few decode steps give finite logits.
  auto kv = (*dec)->AllocateKv(1, 32, 8);
  ASSERT_TRUE(kv.ok()) << kv.status();
  std::vector<int32_t> tokens = testing::RandomPrompt(20, c.vocab_size, 5);
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  ForwardSeq f{std::span<const int32_t>(tokens.data(), 16), 0, kv->get()};
  ASSERT_TRUE((*dec)->Forward({&f, 1}, std::vector<SparseStepSeq>{{1, 8}}, &logits).ok());
  for (int32_t pos = 16; pos < 20; ++pos) {
    ForwardSeq d{std::span<const int32_t>(tokens.data() + pos, 1), pos, kv->get()};
    absl::Status st = (*dec)->Forward({&d, 1}, std::vector<SparseStepSeq>{{1, 8}}, &logits);
    ASSERT_TRUE(st.ok()) << st;
    for (int64_t v = 0; v < c.vocab_size; ++v) ASSERT_TRUE(std::isfinite(logits.as<float>()[v]));
  }
  const SparseEngineStats st = (*dec)->stats();
  EXPECT_EQ(st.sparse_steps, 4);
  EXPECT_EQ(st.decode_seconds.steps, 4);
  EXPECT_GT(st.decode_seconds.total, 0);
  EXPECT_GE(st.decode_seconds.total, st.decode_seconds.observe + st.decode_seconds.select +
                                         st.decode_seconds.forward);
}

}  // namespace
}  // namespace specontext
