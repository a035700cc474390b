// Whole-model checks of the CUDA backend against the CPU backend through the same Transformer:
// logits of every tiny checkpoint family (ragged two-sequence prefill, then batched decode steps),
// and stories260K greedy text from BOS token for token.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/io/weight_source.h"
#include "core/model/transformer.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Model {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
};

Model Load(const std::string& path, std::unique_ptr<Backend> backend) {
  auto ckpt = OpenCheckpoint(path);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  Model m;
  m.backend = std::move(backend);
  auto t = Transformer::Load(*ckpt, m.backend.get());
  EXPECT_TRUE(t.ok()) << path << ": " << t.status();
  if (t.ok()) m.model = std::move(*t);
  return m;
}

// max |got - ref| / max |ref| over all logits.
double RelMaxError(const Tensor& got, const Tensor& ref) {
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) scale = std::max(scale, std::fabs(double(ref.as<float>()[i])));
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double g = got.as<float>()[i];
    if (!std::isfinite(g)) return INFINITY;
    worst = std::max(worst, std::fabs(g - ref.as<float>()[i]));
  }
  return scale > 0 ? worst / scale : worst;
}

std::vector<std::string> TinyCheckpoints() {
  std::vector<std::string> names;
  const std::string dir = std::string(SPECONTEXT_TEST_DATA) + "/tiny";
  if (!std::filesystem::exists(dir)) return names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.is_directory()) names.push_back(e.path().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(CudaModelTest, TinyCheckpointLogitsMatchCpu) {
  SPC_GPU_OR_SKIP(gpu);
  gpu.reset();
  const std::vector<std::string> paths = TinyCheckpoints();
  ASSERT_FALSE(paths.empty()) << "no checkpoints under " << SPECONTEXT_TEST_DATA << "/tiny";
  std::mt19937 rng(FreshSeed());
  for (const std::string& path : paths) {
    Model cpu = Load(path, MakeCpuBackend());
    Model cuda = Load(path, MakeGpuOrNull());
    ASSERT_TRUE(cpu.model && cuda.model) << path;
    const int64_t vocab = cpu.model->config().vocab_size;
    const std::vector<int> lens = {13, 29};
    std::vector<std::vector<int32_t>> prompts;
    for (int len : lens) {
      std::vector<int32_t> p(len);
      for (int32_t& t : p) t = static_cast<int32_t>(rng() % vocab);
      prompts.push_back(p);
    }
    const int steps = 5, cap = 29 + steps;
    std::vector<std::unique_ptr<SequenceKv>> ckv, gkv;
    for (size_t i = 0; i < lens.size(); ++i) {
      ckv.push_back(*cpu.model->AllocateKv(cap));
      gkv.push_back(*cuda.model->AllocateKv(cap));
    }
    // Ragged prefill, logits of every token.
    std::vector<ForwardSeq> cs, gs;
    for (size_t i = 0; i < lens.size(); ++i) {
      cs.push_back({prompts[i], 0, ckv[i].get()});
      gs.push_back({prompts[i], 0, gkv[i].get()});
    }
    Tensor cl = Tensor::HostEmpty(DType::kF32, {13 + 29, vocab}), gl = Tensor::HostEmpty(DType::kF32, {13 + 29, vocab});
    ASSERT_TRUE(cpu.model->Forward(cs, true, &cl).ok());
    absl::Status st = cuda.model->Forward(gs, true, &gl);
    ASSERT_TRUE(st.ok()) << path << ": " << st;
    const double prefill_err = RelMaxError(gl, cl);
    EXPECT_LT(prefill_err, 5e-2) << path << " prefill";
    // Batched decode steps, the same random next tokens on both.
    double decode_err = 0;
    for (int s = 0; s < steps; ++s) {
      std::vector<std::vector<int32_t>> next(lens.size(), std::vector<int32_t>(1));
      cs.clear();
      gs.clear();
      for (size_t i = 0; i < lens.size(); ++i) {
        next[i][0] = static_cast<int32_t>(rng() % vocab);
        cs.push_back({next[i], lens[i] + s, ckv[i].get()});
        gs.push_back({next[i], lens[i] + s, gkv[i].get()});
      }
      Tensor c1 = Tensor::HostEmpty(DType::kF32, {2, vocab}), g1 = Tensor::HostEmpty(DType::kF32, {2, vocab});
      ASSERT_TRUE(cpu.model->Forward(cs, false, &c1).ok());
      ASSERT_TRUE(cuda.model->Forward(gs, false, &g1).ok());
      decode_err = std::max(decode_err, RelMaxError(g1, c1));
    }
    EXPECT_LT(decode_err, 5e-2) << path << " decode";
    std::printf("%s: prefill max err / max |logit| %.2e, decode %.2e\n", path.c_str(), prefill_err, decode_err);
  }
}

std::vector<int32_t> Greedy(Transformer& model, int n) {
  auto kv = *model.AllocateKv(n + 1);
  std::vector<int32_t> out = {1};  // BOS
  const int64_t vocab = model.config().vocab_size;
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> tok = {out.back()};
    ForwardSeq s{tok, i, kv.get()};
    EXPECT_TRUE(model.Forward({&s, 1}, false, &logits).ok());
    const float* l = logits.as<float>();
    out.push_back(static_cast<int32_t>(std::max_element(l, l + vocab) - l));
  }
  return out;
}

TEST(CudaModelTest, Stories260KGreedyTextIsIdentical) {
  SPC_GPU_OR_SKIP(gpu);
  const std::string path = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K/stories260K.bin";
  Model cpu = Load(path, MakeCpuBackend());
  Model cuda = Load(path, std::move(gpu));
  ASSERT_TRUE(cpu.model && cuda.model);
  const std::vector<int32_t> want = Greedy(*cpu.model, 60);
  const std::vector<int32_t> got = Greedy(*cuda.model, 60);
  size_t first_diff = 0;
  while (first_diff < want.size() && got[first_diff] == want[first_diff]) ++first_diff;
  EXPECT_EQ(got, want) << "first difference at token " << first_diff;
}

}  // namespace
}  // namespace specontext::testing
