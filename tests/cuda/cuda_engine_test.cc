// The engine on the CUDA backend: tokens picked on the GPU (Backend::SampleTokens, logits never
// downloaded) with decode steps replayed from CUDA graphs. Greedy output equals the CPU engine's on
// stories260K for concurrent requests of different lengths (the batch shrinks as they finish); seeded
// sampling on the GPU follows the host sampler's draws (same tokens as the CUDA engine sampling on the host).
#include <string>
#include <vector>

#include "core/cuda/cuda_backend_impl.h"
#include "core/io/weight_source.h"
#include "core/model/engine.h"
#include "core/model/transformer.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
};

Loaded Load(std::unique_ptr<Backend> backend) {
  const std::string path = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/stories260K.bin";
  auto ckpt = OpenCheckpoint(path);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  Loaded m;
  m.backend = std::move(backend);
  if (!ckpt.ok()) return m;
  auto t = Transformer::Load(*ckpt, m.backend.get());
  EXPECT_TRUE(t.ok()) << t.status();
  if (t.ok()) m.model = std::move(*t);
  return m;
}

// Runs every request concurrently through one engine; returns each one's tokens.
std::vector<std::vector<int32_t>> RunAll(Transformer& model, const std::vector<GenerationRequest>& reqs,
                                         bool device_sampling) {
  EngineOptions opt;
  opt.device_sampling = device_sampling;
  Engine engine(&model, nullptr, opt);
  std::vector<std::vector<int32_t>> out(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto id = engine.Submit(reqs[i], [&out, i](const StreamEvent& ev) {
      if (ev.token >= 0) out[i].push_back(ev.token);
      EXPECT_TRUE(ev.status.ok()) << ev.status;
    });
    EXPECT_TRUE(id.ok()) << id.status();
  }
  while (engine.HasWork()) {
    const absl::Status st = engine.Step();
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) break;
  }
  return out;
}

std::vector<GenerationRequest> Requests(const Transformer& model, const SamplingParams& sampling) {
  const int32_t bos = static_cast<int32_t>(model.config().bos_token_id);
  std::vector<GenerationRequest> reqs;
  for (int32_t n : {48, 20, 33, 7}) {
    GenerationRequest r;
    r.prompt = {bos};
    r.max_new_tokens = n;
    r.ignore_eos = true;
    r.sampling = sampling;
    r.sampling.seed = 1000 + n;
    reqs.push_back(r);
  }
  return reqs;
}

TEST(CudaEngineTest, GreedyOnGpuEqualsCpuEngine) {
  SPC_GPU_OR_SKIP(gpu);
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(gpu.get());
  ASSERT_NE(cuda, nullptr);
  Loaded cpu = Load(MakeCpuBackend());
  Loaded dev = Load(std::move(gpu));
  ASSERT_TRUE(cpu.model && dev.model);
  const auto reqs = Requests(*cpu.model, SamplingParams{});
  const auto want = RunAll(*cpu.model, reqs, /*device_sampling=*/true);  // CPU: host sampler regardless
  const auto got = RunAll(*dev.model, reqs, /*device_sampling=*/true);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_EQ(static_cast<int32_t>(want[i].size()), reqs[i].max_new_tokens);
    EXPECT_EQ(got[i], want[i]) << "request " << i;
  }
  EXPECT_GT(cuda->graph_stats().replays, 0) << "decode steps did not replay graphs";
  // A prompt that is a prefix of the greedy text continues it the same way (prefill, then decode).
  GenerationRequest cont = reqs[0];
  cont.prompt.insert(cont.prompt.end(), want[0].begin(), want[0].begin() + 10);
  cont.max_new_tokens = 12;
  const auto got_cont = RunAll(*dev.model, {cont}, true);
  EXPECT_EQ(got_cont[0], std::vector<int32_t>(want[0].begin() + 10, want[0].begin() + 22));
}

TEST(CudaEngineTest, SeededSamplingOnGpuFollowsHostSampler) {
  SPC_GPU_OR_SKIP(gpu);
  Loaded dev = Load(std::move(gpu));
  ASSERT_TRUE(dev.model);
  for (const SamplingParams& sp : {SamplingParams{0.9f, 0, 1.0f, 0}, SamplingParams{1.1f, 12, 1.0f, 0},
                                   SamplingParams{0.8f, 0, 0.85f, 0}, SamplingParams{1.0f, 30, 0.7f, 0}}) {
    const auto reqs = Requests(*dev.model, sp);
    const auto host = RunAll(*dev.model, reqs, /*device_sampling=*/false);
    const auto device = RunAll(*dev.model, reqs, /*device_sampling=*/true);
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ(device[i], host[i]) << "request " << i << " T " << sp.temperature << " top_k " << sp.top_k
                                    << " top_p " << sp.top_p;
    }
  }
}

TEST(CudaEngineTest, SampleTokensRejectsBadRows) {
  SPC_GPU_OR_SKIP(gpu);
  Tensor logits = *gpu->Alloc(DType::kF32, {2, 50}, MemoryKind::kWorkspace);
  std::vector<int32_t> tokens(2);
  std::vector<TokenSampling> rows(2);
  rows[1].temperature = -1.0f;
  EXPECT_FALSE(gpu->SampleTokens(logits, rows, tokens).ok());
  rows[1] = TokenSampling{1.0f, 0, 1.0f, 1.0f};  // uniform must be < 1
  EXPECT_FALSE(gpu->SampleTokens(logits, rows, tokens).ok());
  rows.resize(1);
  EXPECT_FALSE(gpu->SampleTokens(logits, rows, tokens).ok());  // row count differs from the logits
}

}  // namespace
}  // namespace specontext::testing
