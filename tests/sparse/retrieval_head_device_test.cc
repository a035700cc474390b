// DeviceRetrievalHead on the CPU backend against the f32 host reference RetrievalHead::Forward: `layer` heads
// (plain, q/k biases + QK norms, YaRN) and `eagle3` heads (also with fused-feature norms and an fc bias), ragged prompt batches and decode batches, cache rows
// outside the written range untouched; plus the backend ops it adds (CopyToColumns, ScatterRows) and bad input.
#include <gtest/gtest.h>

#include <random>

#include "core/cpu/cpu_backend.h"
#include "tests/sparse/head_backend_check.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::CheckObserveAgainstReference;
using testing_sparse::FreshSeed;
using testing_sparse::HeadShape;
using testing_sparse::ObserveSeq;

std::vector<HeadShape> Shapes() {
  std::vector<HeadShape> v;
  HeadShape s;
  v.push_back(s);  // layer, hd 8
  s.bias = s.qk_norm = true;
  s.head_dim = 16;
  v.push_back(s);  // Qwen-style layer
  s = HeadShape();
  s.yarn = true;
  s.head_dim = 64;
  s.n_heads = 8;
  v.push_back(s);
  s = HeadShape();
  s.kind = RetrievalHeadKind::kEagle3;
  v.push_back(s);
  s.qk_norm = true;
  s.hidden = 64;
  s.head_dim = 32;
  v.push_back(s);
  s = HeadShape();  // EAGLE-3.1 fc_norm with an fc bias; speculators norm_before_fc
  s.kind = RetrievalHeadKind::kEagle3;
  s.fused_norm = FusedNorm::kPerLayer;
  s.fc_bias = true;
  v.push_back(s);
  s.fused_norm = FusedNorm::kWhole;
  s.fc_bias = false;
  s.qk_norm = true;
  v.push_back(s);
  return v;
}

TEST(DeviceRetrievalHeadCpu, MatchesTheHostReferenceOnPromptAndDecodeBatches) {
  auto b = MakeCpuBackend();
  for (const HeadShape& s : Shapes()) {
    // Prompt chunks of different lengths at different offsets, then a decode batch.
    CheckObserveAgainstReference(*b, s, {{5, 0, 16}, {1, 37, 64}, {9, 100, 128}}, 2e-5, 2e-5, FreshSeed());
    CheckObserveAgainstReference(*b, s, {{1, 3, 8}, {1, 0, 4}, {1, 63, 64}, {1, 17, 31}}, 2e-5, 2e-5, FreshSeed());
  }
}

TEST(DeviceRetrievalHeadCpu, BadInputIsRefusedBeforeWriting) {
  std::mt19937 rng(FreshSeed());
  auto rh = testing_sparse::MakeRandomHead(HeadShape(), rng);
  ASSERT_TRUE(rh.ok()) << rh.status();
  auto b = MakeCpuBackend();
  auto dh = DeviceRetrievalHead::Create(*rh->head, b.get());
  ASSERT_TRUE(dh.ok());
  auto cache = (*dh)->AllocateCache(4);
  ASSERT_TRUE(cache.ok());
  auto q = b->Alloc(DType::kF32, {3, 4, 8}, MemoryKind::kWorkspace);
  ASSERT_TRUE(q.ok());
  std::vector<DeviceRetrievalHead::Seq> past_capacity = {{&*cache, 3, 2}};
  EXPECT_EQ((*dh)->Observe(std::vector<int32_t>{1, 2, 3}, past_capacity, nullptr, &*q).code(),
            absl::StatusCode::kOutOfRange);
  std::vector<DeviceRetrievalHead::Seq> ok = {{&*cache, 3, 0}};
  EXPECT_EQ((*dh)->Observe(std::vector<int32_t>{1, 97, 3}, ok, nullptr, &*q).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*dh)->Observe(std::vector<int32_t>{1, 2}, ok, nullptr, &*q).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE((*dh)->AllocateCache(0).ok());
  // An eagle3 head without its fused features.
  HeadShape e;
  e.kind = RetrievalHeadKind::kEagle3;
  auto eh = testing_sparse::MakeRandomHead(e, rng);
  ASSERT_TRUE(eh.ok());
  auto edh = DeviceRetrievalHead::Create(*eh->head, b.get());
  ASSERT_TRUE(edh.ok());
  EXPECT_EQ((*edh)->Observe(std::vector<int32_t>{1, 2, 3}, ok, nullptr, &*q).code(), absl::StatusCode::kInvalidArgument);
  // A shared embedding of the wrong shape.
  auto wrong = b->Alloc(DType::kF32, {96, 48}, MemoryKind::kWeights);
  ASSERT_TRUE(wrong.ok());
  EXPECT_FALSE(DeviceRetrievalHead::Create(*eh->head, b.get(), &*wrong).ok());
}

TEST(CpuRetrievalOps, CopyToColumnsAndScatterRowsCheckTheirArguments) {
  auto b = MakeCpuBackend();
  std::mt19937 rng(FreshSeed());
  Tensor src = testing_sparse::RandomF32(rng, {3, 2, 4});
  Tensor dst = testing_sparse::RandomF32(rng, {2, 5, 4});
  const Tensor before = testing_sparse::RandomF32(rng, {2, 5, 4});
  std::copy_n(dst.as<float>(), dst.numel(), before.as<float>());
  std::vector<RowScatter> seg = {{&dst, 1, 2, 3}};
  ASSERT_TRUE(b->ScatterRows(src, seg).ok());
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t p = 0; p < 5; ++p)
      for (int64_t e = 0; e < 4; ++e) {
        const float want = p >= 3 ? src.as<float>()[((1 + p - 3) * 2 + h) * 4 + e] : before.as<float>()[(h * 5 + p) * 4 + e];
        ASSERT_EQ(dst.as<float>()[(h * 5 + p) * 4 + e], want) << h << " " << p;
      }
  std::vector<RowScatter> past_end = {{&dst, 1, 2, 4}}, bad_rows = {{&dst, 2, 2, 0}}, null_dst = {{nullptr, 0, 1, 0}};
  EXPECT_EQ(b->ScatterRows(src, past_end).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(b->ScatterRows(src, bad_rows).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(b->ScatterRows(src, null_dst).code(), absl::StatusCode::kInvalidArgument);
  Tensor wide = testing_sparse::RandomF32(rng, {3, 10}), part = testing_sparse::RandomF32(rng, {3, 4});
  ASSERT_TRUE(b->CopyToColumns(part, 6, &wide).ok());
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j) EXPECT_EQ(wide.as<float>()[i * 10 + 6 + j], part.as<float>()[i * 4 + j]);
  EXPECT_FALSE(b->CopyToColumns(part, 7, &wide).ok());
}

}  // namespace
}  // namespace specontext
