#include "core/sparse/memory_planner.h"

#include <cmath>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::SeedTrace;

// Llama-3.1-8B target with a ~92M-parameter bf16 retrieval head, 80 GB GPU, B = 2048 (the paper's setting).
MemoryPlannerConfig Llama8B() {
  MemoryPlannerConfig c;
  c.mode = MemoryModelMode::kPaper;
  c.n_layers = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.alpha = 4;
  c.budget = 2048;
  c.max_context = 131072;
  c.gpu_memory_bytes = 80'000'000'000;
  c.model_bytes = 16'060'000'000;
  c.dlm_bytes = 184'000'000;
  return c;
}

TEST(MemoryPlanner, PaperThresholdsForLlama8BEqualHandComputedValues) {
  auto p = MemoryPlanner::Create(Llama8B());
  ASSERT_TRUE(p.ok()) << p.status();
  // Hand-computed: ST_i = floor((80e9 - 1.3 (16.06e9 + 0.184e9) - 4 i 2048 R 8 128) / (4 (37 - i) R 8 128)).
  struct Want {
    int32_t r;
    std::vector<int64_t> st;  // i = 0, 1, 2, 8, 16, 32
  };
  for (const Want& w : {Want{4, {97132, 99774, 102566, 123363, 169578, 705676}},
                        Want{16, {24283, 24900, 25553, 30417, 41224, 166588}},
                        Want{32, {12141, 12422, 12718, 14926, 19832, 76740}}}) {
    auto st = p->ThresholdsPerSequence(w.r);
    ASSERT_TRUE(st.ok());
    ASSERT_EQ(st->size(), 33u);
    const int idx[] = {0, 1, 2, 8, 16, 32};
    for (int k = 0; k < 6; ++k) EXPECT_EQ((*st)[idx[k]], w.st[k]) << "R=" << w.r << " i=" << idx[k];
    // Independent evaluation of the formula for every i.
    for (int i = 0; i <= 32; ++i) {
      const double num = 80e9 - 1.3 * (16.06e9 + 0.184e9) - 4.0 * i * 2048 * w.r * 8 * 128;
      EXPECT_EQ((*st)[i], static_cast<int64_t>(std::floor(num / (4.0 * (37 - i) * w.r * 8 * 128)))) << i;
    }
  }
  // The "near 95K / 24K / 12K" for R = 4 / 16 / 32.
  EXPECT_NEAR((*p->ThresholdsPerSequence(4))[0], 95000, 3000);
  EXPECT_NEAR((*p->ThresholdsPerSequence(16))[0], 24000, 800);
  EXPECT_NEAR((*p->ThresholdsPerSequence(32))[0], 12000, 400);
}

TEST(MemoryPlanner, GpuLayersFollowTheThresholdsAndMovesGoLastLayerFirst) {
  auto p = MemoryPlanner::Create(Llama8B());
  ASSERT_TRUE(p.ok());
  auto st = *p->Thresholds(32);
  EXPECT_EQ(*p->GpuLayersFor(st[0], 32), 32);
  EXPECT_EQ(*p->GpuLayersFor(st[0] + 1, 32), 31);
  EXPECT_EQ(*p->GpuLayersFor(st[3], 32), 29);
  EXPECT_EQ(*p->GpuLayersFor(st[3] + 1, 32), 28);
  EXPECT_EQ(p->GpuLayersFor(st[32] + 1, 32).status().code(), absl::StatusCode::kResourceExhausted);
  auto plan = p->PlanMoves(32, st[3] + 1, 32);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->gpu_layers_after, 28);
  ASSERT_EQ(plan->moves.size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(plan->moves[k].layer, 31 - k);
    EXPECT_TRUE(plan->moves[k].to_host);
  }
  // Fewer tokens later: no move back unless allowed, then first layer first.
  EXPECT_TRUE(p->PlanMoves(28, 100, 32)->moves.empty());
  auto back = p->PlanMoves(28, st[1], 32, /*allow_return=*/true);
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->moves.size(), 3u);
  EXPECT_EQ(back->moves[0].layer, 28);
  EXPECT_FALSE(back->moves[0].to_host);
  EXPECT_EQ(back->gpu_layers_after, 31);
}

TEST(MemoryPlanner, MeasuredModeNeverPlansPastTheMemoryAlongAGrowingBatch) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> mb(1, 2000);
  MemoryPlannerConfig c = Llama8B();
  c.mode = MemoryModelMode::kMeasured;
  c.gpu_memory_bytes = 4096ll << 20;  // --gpu-memory-limit 4GiB
  c.n_layers = 16;                    // Llama-3.2-1B shape
  c.head_dim = 64;
  c.measured.weights = 2'470'000'000;
  c.measured.workspace = (mb(rng) % 500) << 20;
  c.measured.graph_pools = mb(rng) << 10;
  c.measured.retrieval_weights = mb(rng) << 16;
  c.measured.other = mb(rng) << 12;
  c.measured.retrieval_cache_per_token = 8 * 64 * 2;
  c.measured.extra_per_token = mb(rng);
  c.measured.extra_per_seq = mb(rng) << 10;
  auto p = MemoryPlanner::Create(c);
  ASSERT_TRUE(p.ok()) << p.status();
  const double mem = static_cast<double>(c.gpu_memory_bytes);
  const int32_t r = 1 + rng() % 4;
  auto st = *p->Thresholds(r);
  for (int i = 0; i <= c.n_layers; ++i) {
    if (st[i] < 0) continue;
    EXPECT_LE(p->PredictBytes(i, st[i], r), mem) << i;
    EXPECT_GT(p->PredictBytes(i, st[i] + 1, r), mem) << i;
  }
  // Grow the batch token by token (in strides): GPU layers only shrink, the prediction always fits.
  int32_t gpu = c.n_layers, moves = 0;
  for (int64_t t = 0; t <= st[c.n_layers]; t += 1 + rng() % 997) {
    auto plan = p->PlanMoves(gpu, t, r);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_LE(plan->gpu_layers_after, gpu);
    moves += plan->moves.size();
    gpu = plan->gpu_layers_after;
    ASSERT_LE(p->PredictBytes(c.n_layers - gpu, t, r), mem) << "t=" << t;
  }
  EXPECT_GT(moves, 0);
  EXPECT_LT(gpu, c.n_layers);
}

TEST(MemoryPlanner, BadInputGivesClearErrors) {
  auto msg = [](const MemoryPlannerConfig& c) { return std::string(MemoryPlanner::Create(c).status().message()); };
  MemoryPlannerConfig c = Llama8B();
  c.budget = 0;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("budget must be at least 1"));
  c = Llama8B();
  c.budget = 200000;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("larger than the context length 131072"));
  c = Llama8B();
  c.gpu_memory_bytes = -5;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("GPU memory must be positive"));
  c = Llama8B();
  c.model_bytes = -1;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("model_bytes"));
  c = Llama8B();
  c.gpu_memory_bytes = 10'000'000'000;  // 16 GB of weights do not fit in 10 GB
  EXPECT_EQ(MemoryPlanner::Create(c).status().code(), absl::StatusCode::kResourceExhausted);
  c = Llama8B();
  c.mode = MemoryModelMode::kMeasured;
  c.measured.workspace = -1;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("workspace"));
  c = Llama8B();
  c.n_kv_heads = 0;
  EXPECT_THAT(msg(c), ::testing::HasSubstr("bad model shape"));
  auto p = MemoryPlanner::Create(Llama8B());
  EXPECT_FALSE(p->Thresholds(0).ok());
  EXPECT_FALSE(p->GpuLayersFor(-1, 1).ok());
  EXPECT_FALSE(p->PlanMoves(33, 10, 1).ok());
}

}  // namespace
}  // namespace specontext
