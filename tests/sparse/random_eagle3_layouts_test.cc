// The random-checkpoint tool's EAGLE-3 drafts in each publisher's layout (tools/random_checkpoint)
// are what prune reads from real drafts: every layout of the same target gives the same fusion
// layers through its own convention, the files are the publisher's (pytorch_model.bin f16 for
// SafeAILab, safetensors with BOOL t2d and I64 d2t otherwise), and d2t/t2d form one vocabulary map.
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/io/weight_files.h"
#include "core/sparse/retrieval_head.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;

struct Want {
  const char* layout;
  const char* preset;
  const char* weights_file;
  DType dtype;
  bool qk_norm;
  FusedNorm fused_norm;
};

class RandomEagle3Layouts : public ::testing::TestWithParam<Want> {};

TEST_P(RandomEagle3Layouts, PruneReadsThemWithTheirConventions) {
  const Want& w = GetParam();
  const fs::path root =
      fs::temp_directory_path() / absl::StrCat("spc_random_layouts_", ::getpid(), "_", w.layout);
  fs::remove_all(root);
  ModelConfig target = *RandomCheckpointPreset(w.preset);
  target.num_hidden_layers = 8;  // fusion layers 2, 4, 5
  const Eagle3Layout layout = *ParseEagle3Layout(w.layout);
  RandomCheckpointOptions o;
  o.dtype = Eagle3LayoutDType(layout);
  o.num_threads = 2;
  o.seed = 7;
  ASSERT_TRUE(WriteRandomEagle3Draft(target, (root / "draft").string(), o, layout).ok());
  absl::StatusOr<WeightFiles> files = OpenWeightFiles((root / "draft").string());
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(files->file, w.weights_file);
  const WeightSource& ws = *files->weights;
  EXPECT_EQ(ws.Get("fc.weight")->dtype(), w.dtype);
  // d2t [draft vocab] int64 and t2d [vocab] bool agree: the ids t2d marks are exactly i + d2t[i],
  // increasing.
  Tensor d2t = *ws.Get("d2t"), t2d = *ws.Get("t2d");
  ASSERT_EQ(d2t.dtype(), DType::kI64);
  ASSERT_EQ(t2d.dtype(), DType::kBool);
  ASSERT_EQ(t2d.numel(), target.vocab_size);
  std::vector<int64_t> marked;
  for (int64_t j = 0; j < t2d.numel(); ++j) {
    if (static_cast<const uint8_t*>(t2d.data())[j]) marked.push_back(j);
  }
  ASSERT_EQ(static_cast<int64_t>(marked.size()), d2t.numel());
  for (int64_t i = 0; i < d2t.numel(); ++i) ASSERT_EQ(marked[i], i + d2t.as<int64_t>()[i]) << i;

  auto report = PruneToRetrievalHead((root / "draft").string(), RetrievalHeadKind::kEagle3, target,
                                     w.preset, (root / "head").string());
  ASSERT_TRUE(report.ok()) << report.status();
  std::ifstream in(root / "head" / "config.json");
  const RetrievalHeadConfig c = *ParseRetrievalHeadConfig(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  EXPECT_THAT(c.fusion_layers, ElementsAre(2, 4, 5)) << w.layout;
  EXPECT_EQ(c.attn.qk_norm, w.qk_norm);
  EXPECT_EQ(c.fused_norm, w.fused_norm);
  const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(root / "draft" / "config.json"));
  if (layout == Eagle3Layout::kSpeculators) {
    // Trained with the verifier's own RoPE (its config is the layer's).
    EXPECT_EQ(c.attn.rope_theta, target.rope_theta);
    EXPECT_EQ(cfg["transformer_layer_config"]["num_hidden_layers"], 1);
  } else {
    EXPECT_EQ(cfg["max_position_embeddings"], 2048) << "drafts are trained at 2K";
    EXPECT_EQ(c.attn.rope_theta, target.arch == Architecture::kLlama ? 10000.0 : target.rope_theta);
    EXPECT_TRUE(c.attn.rope_scaling.type.empty());
  }
  fs::remove_all(root);
}

INSTANTIATE_TEST_SUITE_P(Layouts, RandomEagle3Layouts,
                         ::testing::Values(Want{"safeailab", "tiny-llama", "pytorch_model.bin",
                                                DType::kF16, false, FusedNorm::kNone},
                                           Want{"specforge", "tiny-llama", "model.safetensors",
                                                DType::kBF16, false, FusedNorm::kNone},
                                           Want{"specforge", "tiny-qwen3", "model.safetensors",
                                                DType::kBF16, false, FusedNorm::kNone},
                                           Want{"eagle3.1", "tiny-llama", "model.safetensors",
                                                DType::kBF16, false, FusedNorm::kPerLayer},
                                           Want{"speculators", "tiny-llama", "model.safetensors",
                                                DType::kBF16, false, FusedNorm::kNone},
                                           Want{"speculators", "tiny-qwen3", "model.safetensors",
                                                DType::kBF16, true, FusedNorm::kNone}),
                         [](const ::testing::TestParamInfo<Want>& info) {
                           std::string s = absl::StrCat(info.param.layout, "_", info.param.preset);
                           for (char& ch : s)
                             ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return s;
                         });

}  // namespace
}  // namespace specontext
