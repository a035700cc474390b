// `prune --kind eagle3` on drafts in each publisher's layout, written by the publishers' own
// libraries (tests/data/eagle3, tools/reference/make_draft_fixtures.py): SafeAILab
// pytorch_model.bin, SpecForge safetensors with BOOL t2d and layer-output fusion ids, EAGLE-3.1
// fc_norm, vLLM speculators (layers.0.*, nested config, Qwen3 q/k norms, norm_before_fc). Each
// head's tensors and fusion layers against hand-computed expectations, its forward against a
// double-precision reference, and the refusals (shapes, forbidden pickles, no weights).
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/io/safetensors.h"
#include "core/io/torch_zip_writer.h"
#include "core/sparse/retrieval_head.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/sparse/head_fixture.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_sparse::FreshSeed;
using testing_sparse::NamedWeights;

const std::string kDrafts = std::string(SPECONTEXT_TEST_DATA) + "/eagle3/";

// The fixtures' target: hidden 32, 8 layers, 4 query / 2 KV heads of dim 8, vocabulary 320.
ModelConfig Target() {
  ModelConfig m;
  m.vocab_size = 320;
  m.hidden_size = 32;
  m.intermediate_size = 48;
  m.num_hidden_layers = 8;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  m.head_dim = 8;
  m.max_position_embeddings = 4096;
  m.rms_norm_eps = 1e-5;
  m.rope_theta = 500000;
  return m;
}

// The generator's values: element k of NAME is ((37 k + salt) mod 31 - 15) / 16, salt =
// FNV-1a(NAME) mod 997.
double Pattern(const std::string& name, int64_t k) {
  uint32_t h = 0x811c9dc5u;
  for (unsigned char c : name) h = (h ^ c) * 0x01000193u;
  return static_cast<double>((37 * k + h % 997) % 31 - 15) / 16.0;
}
std::vector<double> Values(const std::string& name, int64_t n) {
  std::vector<double> v(n);
  for (int64_t k = 0; k < n; ++k) v[k] = Pattern(name, k);
  return v;
}

class Eagle3DraftTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("spc_eagle3_draft_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& n) const { return (dir_ / n).string(); }

  absl::StatusOr<PruneReport> Prune(const std::string& source, const PruneOptions& o = {}) {
    return PruneToRetrievalHead(source, RetrievalHeadKind::kEagle3, Target(), "tiny-target",
                                Path("head"), o);
  }
  RetrievalHeadConfig HeadConfig() {
    std::ifstream in(Path("head/config.json"));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return *ParseRetrievalHeadConfig(text);
  }
  // The head holds exactly `want` (head name -> draft name), each with the draft's values and
  // `shape`. `also`: further head tensors, checked by the caller.
  void ExpectHeadTensors(const std::vector<std::tuple<std::string, std::string, Shape>>& want,
                         DType dtype, std::vector<std::string> also = {}) {
    auto ws = OpenSafetensors(Path("head/model.safetensors"));
    ASSERT_TRUE(ws.ok()) << ws.status();
    std::vector<std::string> names = std::move(also);
    for (const auto& [head, draft, shape] : want) {
      names.push_back(head);
      absl::StatusOr<Tensor> t = (*ws)->Get(head);
      ASSERT_TRUE(t.ok()) << head;
      EXPECT_EQ(t->shape(), shape) << head;
      EXPECT_EQ(t->dtype(), dtype) << head;
      std::vector<float> v(t->numel());
      ConvertToF32(t->data(), t->dtype(), v.data(), t->numel());
      for (int64_t k = 0; k < t->numel(); ++k)
        ASSERT_EQ(v[k], Pattern(draft, k)) << head << "[" << k << "] from " << draft;
    }
    EXPECT_THAT((*ws)->Names(), ::testing::UnorderedElementsAreArray(names));
  }
  fs::path dir_;
};

// Writes a copy of a fixture with `edit` applied to its config and tensors (safetensors fixtures).
void CopyFixture(const std::string& from, const std::string& to,
                 const std::function<void(nlohmann::json*,
                                          std::vector<std::pair<std::string, Tensor>>*)>& edit) {
  fs::create_directories(to);
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(from + "/config.json"));
  auto ws = OpenSafetensors(from + "/model.safetensors");
  ASSERT_TRUE(ws.ok()) << ws.status();
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& n : (*ws)->Names()) tensors.emplace_back(n, *(*ws)->Get(n));
  edit(&cfg, &tensors);
  std::ofstream(to + "/config.json") << cfg.dump(2);
  ASSERT_TRUE(WriteSafetensors(to + "/model.safetensors", tensors).ok());
}

TEST_F(Eagle3DraftTest, SafeAILabPytorchBin) {
  auto report = Prune(kDrafts + "safeailab");
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->source, "EAGLE-3 draft, safeailab layout, pytorch_model.bin");
  // Floating tensors of the draft: layer 9824 (q 2048, k/v 1024 each, o 1024, MLP 4608, 3 norms
  // 96), fc 3072, norm 32, lm_head 2048; d2t/t2d are not parameters. Kept: fc, two norms, q, k.
  EXPECT_EQ(report->parameters_before, 14976);
  EXPECT_EQ(report->parameters_after, 3072 + 64 + 2048 + 1024);
  const RetrievalHeadConfig c = HeadConfig();
  // SafeAILab fuses the residual entering layers 2, L/2, L-3; no config key.
  EXPECT_THAT(c.fusion_layers, ElementsAre(2, 4, 5));
  EXPECT_EQ(c.attn.rope_theta, 10000.0) << "SafeAILab trains with base 10000";
  EXPECT_TRUE(c.attn.rope_scaling.type.empty());
  EXPECT_EQ(c.attn.max_position_embeddings, 2048);
  EXPECT_EQ(c.attn.arch, Architecture::kLlama);
  EXPECT_EQ(c.fused_norm, FusedNorm::kNone);
  EXPECT_EQ(c.format_version(), 1);
  ExpectHeadTensors({{"fc.weight", "fc.weight", {32, 96}},
                     {"hidden_norm.weight", "midlayer.hidden_norm.weight", {32}},
                     {"input_layernorm.weight", "midlayer.input_layernorm.weight", {32}},
                     {"q_proj.weight", "midlayer.self_attn.q_proj.weight", {32, 64}},
                     {"k_proj.weight", "midlayer.self_attn.k_proj.weight", {16, 64}}},
                    DType::kF16);
  // The paper's stretch: YaRN from the 2K the draft was trained at to the target's 4096 positions.
  PruneOptions yarn;
  yarn.yarn_auto = true;
  ASSERT_TRUE(Prune(kDrafts + "safeailab", yarn).ok());
  const RetrievalHeadConfig y = HeadConfig();
  EXPECT_EQ(y.attn.rope_scaling.type, "yarn");
  EXPECT_EQ(y.attn.rope_scaling.factor, 2.0);
  EXPECT_EQ(y.attn.rope_scaling.original_max_position_embeddings, 2048);
  EXPECT_EQ(y.attn.max_position_embeddings, 4096);
  PruneOptions theta;
  theta.rope_theta = 250000;
  theta.yarn_factor = 8;
  theta.original_max_position = 1024;
  theta.yarn_beta_fast = 16;
  ASSERT_TRUE(Prune(kDrafts + "safeailab", theta).ok());
  const RetrievalHeadConfig t = HeadConfig();
  EXPECT_EQ(t.attn.rope_theta, 250000.0);
  EXPECT_EQ(t.attn.rope_scaling.factor, 8.0);
  EXPECT_EQ(t.attn.rope_scaling.original_max_position_embeddings, 1024);
  EXPECT_EQ(t.attn.rope_scaling.beta_fast, 16.0);
}

TEST_F(Eagle3DraftTest, SpecForgeSafetensorsWithBoolT2dAndLayerOutputIds) {
  auto report = Prune(kDrafts + "specforge");
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->source, "EAGLE-3 draft, specforge layout, model.safetensors");
  const RetrievalHeadConfig c = HeadConfig();
  // eagle_config ids [0, 3, 6] are layer outputs (SGLang captures the input of id + 1).
  EXPECT_THAT(c.fusion_layers, ElementsAre(1, 4, 7));
  EXPECT_THAT(report->notes,
              ::testing::Contains(HasSubstr("are layer outputs (SpecForge/SGLang)")));
  EXPECT_EQ(c.attn.rope_theta, 1000000.0) << "SpecForge honours the config's rope_theta";
  ExpectHeadTensors({{"fc.weight", "fc.weight", {32, 96}},
                     {"hidden_norm.weight", "midlayer.hidden_norm.weight", {32}},
                     {"input_layernorm.weight", "midlayer.input_layernorm.weight", {32}},
                     {"q_proj.weight", "midlayer.self_attn.q_proj.weight", {32, 64}},
                     {"k_proj.weight", "midlayer.self_attn.k_proj.weight", {16, 64}}},
                    DType::kBF16);
}

TEST_F(Eagle3DraftTest, ModelPrefixedNamesAsTensorRtLlmExportsThem) {
  CopyFixture(kDrafts + "specforge", Path("prefixed"), [](nlohmann::json*, auto* t) {
    for (auto& [n, x] : *t) {
      if (n != "lm_head.weight" && n != "norm.weight")
        n = "model." + n;  // model.fc.weight, model.midlayer.*
    }
  });
  ASSERT_TRUE(Prune(Path("prefixed")).ok()) << Prune(Path("prefixed")).status();
  EXPECT_THAT(HeadConfig().fusion_layers, ElementsAre(1, 4, 7));
  ExpectHeadTensors({{"fc.weight", "fc.weight", {32, 96}},
                     {"hidden_norm.weight", "midlayer.hidden_norm.weight", {32}},
                     {"input_layernorm.weight", "midlayer.input_layernorm.weight", {32}},
                     {"q_proj.weight", "midlayer.self_attn.q_proj.weight", {32, 64}},
                     {"k_proj.weight", "midlayer.self_attn.k_proj.weight", {16, 64}}},
                    DType::kBF16);
}

TEST_F(Eagle3DraftTest, SpecForgeFcBiasAndShapeMismatchNamingTheTensor) {
  // SGLang gives fc a bias when the config says `bias: true`.
  CopyFixture(kDrafts + "specforge", Path("biased"), [](nlohmann::json* cfg, auto* t) {
    (*cfg)["bias"] = true;
    Tensor b = Tensor::HostEmpty(DType::kF32, {32});
    for (int k = 0; k < 32; ++k) b.as<float>()[k] = static_cast<float>(Pattern("fc.bias", k));
    t->emplace_back("fc.bias", b);
  });
  ASSERT_TRUE(Prune(Path("biased")).ok());
  EXPECT_TRUE(HeadConfig().fc_bias);
  EXPECT_EQ(HeadConfig().format_version(), 2);
  auto head = OpenSafetensors(Path("head/model.safetensors"));
  ASSERT_TRUE((*head)->Has("fc.bias"));
  // A k projection one column short.
  CopyFixture(kDrafts + "specforge", Path("short"), [](nlohmann::json*, auto* t) {
    for (auto& [n, x] : *t) {
      if (n == "midlayer.self_attn.k_proj.weight") x = Tensor::HostEmpty(DType::kBF16, {16, 63});
    }
  });
  auto r = Prune(Path("short"));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(),
              HasSubstr("tensor midlayer.self_attn.k_proj.weight has shape [16, 63] but the "
                        "source config implies [16, 64]"));
  // A t2d of the wrong dtype is carried, not used: only the tensors the head keeps are checked.
  CopyFixture(kDrafts + "specforge", Path("fp_t2d"), [](nlohmann::json*, auto* t) {
    for (auto& [n, x] : *t) {
      if (n == "t2d") x = Tensor::HostEmpty(DType::kF8E4M3, {320});
    }
  });
  EXPECT_TRUE(Prune(Path("fp_t2d")).ok());
}

// q of one token at position 0 (RoPE is the identity there) in double: the head's math written out.
std::vector<double> ReferenceQ(const RetrievalHeadConfig& c, const std::vector<double>& emb,
                               const std::vector<double>& fused, const std::string& layer,
                               const std::vector<std::string>& fused_norms) {
  const double eps = c.attn.rms_norm_eps;
  auto rms = [eps](std::vector<double> x, const std::vector<double>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
    for (size_t i = 0; i < x.size(); ++i) x[i] *= inv * w[i];
    return x;
  };
  const int64_t h = 32, fw = 96;
  std::vector<double> f = fused;
  if (fused_norms.size() == 3) {  // EAGLE-3.1 fc_norm: each third on its own
    for (int g = 0; g < 3; ++g) {
      std::vector<double> part(f.begin() + g * 32, f.begin() + (g + 1) * 32);
      part = rms(part, Values(fused_norms[g], 32));
      std::copy(part.begin(), part.end(), f.begin() + g * 32);
    }
  } else if (fused_norms.size() == 1) {  // norm_before_fc: the whole row
    f = rms(f, Values(fused_norms[0], fw));
  }
  const std::vector<double> fc = Values("fc.weight", h * fw);
  std::vector<double> y(h, 0.0);
  for (int64_t r = 0; r < h; ++r) {
    for (int64_t k = 0; k < fw; ++k) y[r] += fc[r * fw + k] * f[k];
  }
  std::vector<double> x = rms(emb, Values(layer + "input_layernorm.weight", h));
  const std::vector<double> hn = rms(y, Values(layer + "hidden_norm.weight", h));
  x.insert(x.end(), hn.begin(), hn.end());
  const int64_t rows = c.attn.num_attention_heads * c.attn.head_dim;
  const std::vector<double> wq = Values(layer + "self_attn.q_proj.weight", rows * 2 * h);
  std::vector<double> q(rows, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < 2 * h; ++k) q[r] += wq[r * 2 * h + k] * x[k];
  }
  if (c.attn.qk_norm) {  // Qwen3: per-head RMSNorm before RoPE
    for (int64_t head = 0; head < c.attn.num_attention_heads; ++head) {
      std::vector<double> v(q.begin() + head * 8, q.begin() + (head + 1) * 8);
      v = rms(v, Values(layer + "self_attn.q_norm.weight", 8));
      std::copy(v.begin(), v.end(), q.begin() + head * 8);
    }
  }
  return q;
}

void CheckForward(const std::string& head_dir, const std::string& layer,
                  const std::vector<std::string>& fused_norms) {
  std::mt19937 rng(FreshSeed());
  Tensor embed = testing_sparse::RandomF32(rng, {320, 32});
  NamedWeights target_w({{"model.embed_tokens.weight", embed}});
  auto head = RetrievalHead::Load(head_dir, Target(), &target_w);
  ASSERT_TRUE(head.ok()) << head.status();
  Tensor fused = testing_sparse::RandomF32(rng, {1, 96}, -3.0f, 3.0f);
  Tensor q = Tensor::HostEmpty(DType::kF32, {1, 4, 8}),
         k = Tensor::HostEmpty(DType::kF32, {1, 2, 8});
  const int32_t id = static_cast<int32_t>(rng() % 320);
  ASSERT_TRUE((*head)->Forward({id}, {0}, fused, &q, &k).ok());
  const std::vector<double> emb(embed.as<float>() + id * 32, embed.as<float>() + (id + 1) * 32);
  const std::vector<double> f(fused.as<float>(), fused.as<float>() + 96);
  const std::vector<double> want = ReferenceQ((*head)->config(), emb, f, layer, fused_norms);
  for (int j = 0; j < 32; ++j)
    EXPECT_NEAR(q.as<float>()[j], want[j], 1e-4 + 1e-4 * std::fabs(want[j])) << j;
}

TEST_F(Eagle3DraftTest, Eagle31FcNormIsKeptAndApplied) {
  auto report = Prune(kDrafts + "eagle31");
  ASSERT_TRUE(report.ok()) << report.status();
  const RetrievalHeadConfig c = HeadConfig();
  EXPECT_EQ(c.fused_norm, FusedNorm::kPerLayer);
  EXPECT_EQ(c.format_version(), 2);
  EXPECT_THAT(c.fusion_layers, ElementsAre(2, 4, 5)) << "no eagle_config: SGLang's default inputs";
  ExpectHeadTensors({{"fc.weight", "fc.weight", {32, 96}},
                     {"hidden_norm.weight", "midlayer.hidden_norm.weight", {32}},
                     {"input_layernorm.weight", "midlayer.input_layernorm.weight", {32}},
                     {"q_proj.weight", "midlayer.self_attn.q_proj.weight", {32, 64}},
                     {"k_proj.weight", "midlayer.self_attn.k_proj.weight", {16, 64}}},
                    DType::kBF16, {"fc_norm.weight"});
  // fc_norm.weight is the three per-layer weights back to back.
  auto ws = OpenSafetensors(Path("head/model.safetensors"));
  Tensor fn = *(*ws)->Get("fc_norm.weight");
  ASSERT_EQ(fn.shape(), Shape({96}));
  std::vector<float> v(96);
  ConvertToF32(fn.data(), fn.dtype(), v.data(), 96);
  for (int k = 0; k < 96; ++k)
    EXPECT_EQ(v[k], Pattern(absl::StrCat("fc_norm.", k / 32, ".weight"), k % 32)) << k;
  CheckForward(Path("head"), "midlayer.",
               {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"});
}

TEST_F(Eagle3DraftTest, SpeculatorsNamingNestedConfigQwen3LayerAndNormBeforeFc) {
  auto report = Prune(kDrafts + "speculators");
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->source, "EAGLE-3 draft, speculators layout, model.safetensors");
  const RetrievalHeadConfig c = HeadConfig();
  // Top-level ids are HF hidden_states indices (vLLM: inputs of those layers), kept as they are.
  EXPECT_THAT(c.fusion_layers, ElementsAre(1, 3, 6));
  EXPECT_EQ(c.attn.arch, Architecture::kQwen3) << "the Qwen3 layer keeps its q/k norms";
  EXPECT_TRUE(c.attn.qk_norm);
  EXPECT_EQ(c.attn.rope_theta, 1000000.0);
  EXPECT_EQ(c.attn.max_position_embeddings, 32768)
      << "absent from to_diff_dict: Qwen3Config's default";
  EXPECT_EQ(c.fused_norm, FusedNorm::kWhole);
  ExpectHeadTensors({{"fc.weight", "fc.weight", {32, 96}},
                     {"fc_norm.weight", "input_norm.weight", {96}},
                     {"hidden_norm.weight", "layers.0.hidden_norm.weight", {32}},
                     {"input_layernorm.weight", "layers.0.input_layernorm.weight", {32}},
                     {"q_proj.weight", "layers.0.self_attn.q_proj.weight", {32, 64}},
                     {"k_proj.weight", "layers.0.self_attn.k_proj.weight", {16, 64}},
                     {"q_norm.weight", "layers.0.self_attn.q_norm.weight", {8}},
                     {"k_norm.weight", "layers.0.self_attn.k_norm.weight", {8}}},
                    DType::kBF16);
  CheckForward(Path("head"), "layers.0.", {"input_norm.weight"});
}

TEST_F(Eagle3DraftTest, RefusalsNameWhatIsWrong) {
  // A pytorch_model.bin whose pickle would call os.system.
  fs::create_directories(Path("evil"));
  fs::copy_file(kDrafts + "safeailab/config.json", Path("evil/config.json"));
  fs::copy_file(std::string(SPECONTEXT_TEST_DATA) + "/torch/forbidden_global.bin",
                Path("evil/pytorch_model.bin"));
  auto evil = Prune(Path("evil"));
  ASSERT_FALSE(evil.ok());
  EXPECT_THAT(evil.status().message(), HasSubstr("global os.system is not allowed"));
  // No weights at all: every file looked for is named.
  fs::create_directories(Path("empty"));
  fs::copy_file(kDrafts + "safeailab/config.json", Path("empty/config.json"));
  auto empty = Prune(Path("empty"));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(empty.status().message(),
              HasSubstr("looked for model.safetensors, model.safetensors.index.json, "
                        "pytorch_model.bin, pytorch_model.bin.index.json"));
  // Fusion ids past the target, a draft fusing four layers, the wrong publisher forced.
  CopyFixture(kDrafts + "specforge", Path("late"), [](nlohmann::json* cfg, auto*) {
    (*cfg)["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = {0, 3,
                                                                  7};  // output of the last layer
  });
  EXPECT_THAT(Prune(Path("late")).status().message(),
              HasSubstr("layer 8 is not below the target's 8 layers"));
  CopyFixture(kDrafts + "speculators", Path("four"), [](nlohmann::json* cfg, auto*) {
    (*cfg)["eagle_aux_hidden_state_layer_ids"] = {1, 2, 3, 4};
  });
  EXPECT_THAT(Prune(Path("four")).status().message(), HasSubstr("fuses 4 target layers"));
  // A draft of another target (its vocabulary, its fused width).
  CopyFixture(kDrafts + "specforge", Path("vocab"),
              [](nlohmann::json* cfg, auto*) { (*cfg)["vocab_size"] = 128256; });
  EXPECT_THAT(Prune(Path("vocab")).status().message(),
              HasSubstr("vocab_size is 128256 in the draft but 320 in the target"));
  CopyFixture(kDrafts + "speculators", Path("wide"),
              [](nlohmann::json* cfg, auto*) { (*cfg)["target_hidden_size"] = 64; });
  EXPECT_THAT(Prune(Path("wide")).status().message(),
              HasSubstr("target_hidden_size is 64 in the draft but 32"));
  PruneOptions forced;
  forced.publisher = DraftPublisher::kSpeculators;
  EXPECT_THAT(Prune(kDrafts + "specforge", forced).status().message(),
              HasSubstr("transformer_layer_config"));
  forced.publisher = DraftPublisher::kSafeAILab;
  auto as_safeailab = Prune(kDrafts + "specforge", forced);
  ASSERT_TRUE(as_safeailab.ok()) << as_safeailab.status();
  EXPECT_EQ(HeadConfig().attn.rope_theta, 10000.0);
  EXPECT_THAT(as_safeailab->notes,
              ::testing::Contains(HasSubstr("the config's 1e+06 is not used")));
}

}  // namespace
}  // namespace specontext
