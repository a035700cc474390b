// Golden test: logits of tiny random checkpoints (written by specontext-random-checkpoint, one per
// family) equal those HF transformers computed from the same files (tools/reference/
// make_logits_reference.py, run on the GPU machine) within 1e-4 relative, in f32.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/runtime/runtime.h"

namespace specontext {
namespace {

std::vector<std::string> Checkpoints() {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(SPECONTEXT_TEST_DATA "/tiny")) {
    if (e.is_directory()) names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

class HfLogits : public ::testing::TestWithParam<std::string> {};

TEST_P(HfLogits, MatchTransformers) {
  const std::string name = GetParam();
  std::ifstream in(std::string(SPECONTEXT_TEST_DATA "/hf_reference/") + name + ".json");
  ASSERT_TRUE(in.good()) << "missing reference for " << name << ": run tools/reference/make_logits_reference.py";
  const nlohmann::json ref = nlohmann::json::parse(in);
  RuntimeOptions ro;
  ro.model_path = std::string(SPECONTEXT_TEST_DATA "/tiny/") + name;
  ro.backend = "cpu";
  auto rt = LoadRuntime(ro);
  ASSERT_TRUE(rt.ok()) << rt.status();
  const std::vector<int32_t> tokens = ref["tokens"].get<std::vector<int32_t>>();
  const std::vector<float> expected = ref["logits"].get<std::vector<float>>();
  const int64_t vocab = ref["vocab"].get<int64_t>();
  ASSERT_EQ(vocab, rt->model->config().vocab_size);
  ASSERT_EQ(expected.size(), tokens.size() * vocab);
  auto kv = rt->model->AllocateKv(static_cast<int32_t>(tokens.size())).value();
  Tensor logits = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(tokens.size()), vocab});
  ForwardSeq seq{tokens, 0, kv.get()};
  ASSERT_TRUE(rt->model->Forward({&seq, 1}, true, &logits).ok());
  double worst = 0, max_abs = 0;
  for (size_t i = 0; i < expected.size(); ++i) max_abs = std::max(max_abs, std::fabs(double(expected[i])));
  for (size_t i = 0; i < expected.size(); ++i) {
    const double got = logits.as<float>()[i];
    ASSERT_TRUE(std::isfinite(got));
    // Relative to the logits' scale: single near-zero logits make per-element ratios meaningless.
    worst = std::max(worst, std::fabs(got - expected[i]) / max_abs);
  }
  std::printf("%s: max |ours - HF| / max |HF| = %.2e\n", name.c_str(), worst);
  EXPECT_LT(worst, 1e-4) << name;
}

INSTANTIATE_TEST_SUITE_P(Families, HfLogits, ::testing::ValuesIn(Checkpoints()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n) if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

}  // namespace
}  // namespace specontext
