#include "core/sparse/retrieval_head.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "core/io/safetensors.h"
#include "core/sparse/selection.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sparse/head_fixture.h"
#include "tests/sparse/test_util.h"

namespace specontext {
namespace {

using testing_sparse::FreshSeed;
using testing_sparse::NamedWeights;
using testing_sparse::RandomF32;
using testing_sparse::SeedTrace;
using Named = std::vector<std::pair<std::string, Tensor>>;
namespace fs = std::filesystem;

// A small target: hidden 48, 8 layers, 4 query / 2 KV heads of dim 8, vocab 97.
ModelConfig Target() {
  ModelConfig m;
  m.vocab_size = 97;
  m.hidden_size = 48;
  m.intermediate_size = 64;
  m.num_hidden_layers = 8;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  m.head_dim = 8;
  m.max_position_embeddings = 4096;
  m.rms_norm_eps = 1e-5;
  m.rope_theta = 10000;
  return m;
}

std::string TempDir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("spc_sparse_" + name + "_" + std::to_string(FreshSeed()));
  fs::create_directories(p);
  return p.string();
}

Tensor Bf16(std::mt19937& rng, Shape shape) {
  Tensor f = RandomF32(rng, shape, -0.5f, 0.5f);
  Tensor b = Tensor::HostEmpty(DType::kBF16, shape);
  ConvertFromF32(f.as<float>(), DType::kBF16, b.data(), f.numel());
  return b;
}

std::vector<double> F64(const Tensor& t) {
  std::vector<float> f(t.numel());
  ConvertToF32(t.data(), t.dtype(), f.data(), t.numel());
  return std::vector<double>(f.begin(), f.end());
}

// Writes an EAGLE-3-layout draft (every tensor a real draft has, bf16) and returns its tensors.
Named WriteEagle3Draft(std::mt19937& rng, const std::string& dir, const ModelConfig& t) {
  const int64_t h = t.hidden_size, nq = 4, nkv = t.num_key_value_heads, hd = t.head_dim;
  Named w = {{"fc.weight", Bf16(rng, {h, 3 * h})},
             {"midlayer.hidden_norm.weight", Bf16(rng, {h})},
             {"midlayer.input_layernorm.weight", Bf16(rng, {h})},
             {"midlayer.self_attn.q_proj.weight", Bf16(rng, {nq * hd, 2 * h})},
             {"midlayer.self_attn.k_proj.weight", Bf16(rng, {nkv * hd, 2 * h})},
             {"midlayer.self_attn.v_proj.weight", Bf16(rng, {nkv * hd, 2 * h})},
             {"midlayer.self_attn.o_proj.weight", Bf16(rng, {h, nq * hd})},
             {"midlayer.post_attention_layernorm.weight", Bf16(rng, {h})},
             {"midlayer.mlp.gate_proj.weight", Bf16(rng, {64, h})},
             {"midlayer.mlp.up_proj.weight", Bf16(rng, {64, h})},
             {"midlayer.mlp.down_proj.weight", Bf16(rng, {h, 64})},
             {"norm.weight", Bf16(rng, {h})},
             {"lm_head.weight", Bf16(rng, {32, h})},
             {"embed_tokens.weight", Bf16(rng, {t.vocab_size, h})}};
  EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", w).ok());
  std::ofstream(dir + "/config.json") << R"({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
    "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "num_hidden_layers": 1, "vocab_size": 97, "draft_vocab_size": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}})";
  return w;
}

const Tensor& Find(const Named& w, const std::string& name) {
  for (const auto& [n, t] : w) if (n == name) return t;
  static Tensor none;
  ADD_FAILURE() << "no " << name;
  return none;
}

void RmsNormRef(std::vector<double>& x, const std::vector<double>& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  for (size_t i = 0; i < x.size(); ++i) x[i] = x[i] * inv * w[i];
}

// q or k of one token before RoPE, in double: W · x.
std::vector<double> Project(const std::vector<double>& w, int64_t rows, const std::vector<double>& x) {
  std::vector<double> y(rows, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < x.size(); ++c) y[r] += w[r * x.size() + c] * x[c];
  return y;
}

TEST(RetrievalHead, PrunesAnEagle3DraftAndMatchesAReferenceForward) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const ModelConfig target = Target();
  const std::string src = TempDir("eagle3_src"), dst = TempDir("eagle3_head");
  Named draft = WriteEagle3Draft(rng, src, target);
  auto report = PruneToRetrievalHead(src, RetrievalHeadKind::kEagle3, target, "tiny-target", dst);
  ASSERT_TRUE(report.ok()) << report.status();
  int64_t before = 0;
  for (const auto& [n, t] : draft) before += t.numel();
  const int64_t h = 48, after = h * 3 * h + 2 * h + 32 * 2 * h + 16 * 2 * h;
  EXPECT_EQ(report->parameters_before, before);
  EXPECT_EQ(report->parameters_after, after);
  // The target's embedding is shared.
  NamedWeights target_w({{"model.embed_tokens.weight", Bf16(rng, {97, h})}});
  auto head = RetrievalHead::Load(dst, target, &target_w);
  ASSERT_TRUE(head.ok()) << head.status();
  const RetrievalHead& rh = **head;
  EXPECT_EQ(rh.parameter_count(), after);
  EXPECT_EQ(rh.config().kind, RetrievalHeadKind::kEagle3);
  EXPECT_EQ(rh.config().attn.rope_scaling.type, "yarn");
  EXPECT_THAT(rh.config().fusion_layers, ::testing::ElementsAre(2, 4, 5));
  // Forward of 3 tokens vs a double-precision reference (RoPE checked separately below: position 0).
  const std::vector<int32_t> ids = {5, 96, 0};
  Tensor fused = RandomF32(rng, {3, 3 * h});
  Tensor q = Tensor::HostEmpty(DType::kF32, {3, 4, 8}), k = Tensor::HostEmpty(DType::kF32, {3, 2, 8});
  ASSERT_TRUE(rh.Forward(ids, {0, 0, 0}, fused, &q, &k).ok());
  const auto emb = F64(*target_w.Get("model.embed_tokens.weight")), fc = F64(Find(draft, "fc.weight"));
  const auto in_ln = F64(Find(draft, "midlayer.input_layernorm.weight"));
  const auto hid_ln = F64(Find(draft, "midlayer.hidden_norm.weight"));
  const auto wq = F64(Find(draft, "midlayer.self_attn.q_proj.weight"));
  const auto wk = F64(Find(draft, "midlayer.self_attn.k_proj.weight"));
  for (int i = 0; i < 3; ++i) {
    std::vector<double> e(emb.begin() + ids[i] * h, emb.begin() + (ids[i] + 1) * h);
    RmsNormRef(e, in_ln, 1e-5);
    std::vector<double> hv(fused.as<float>() + i * 3 * h, fused.as<float>() + (i + 1) * 3 * h);
    std::vector<double> f = Project(fc, h, hv);
    RmsNormRef(f, hid_ln, 1e-5);
    e.insert(e.end(), f.begin(), f.end());  // cat(input_layernorm(emb), hidden_norm(fc(h)))
    const auto qr = Project(wq, 32, e), kr = Project(wk, 16, e);
    // YaRN's attention scaling multiplies cos/sin, so at position 0 q = mscale · W x.
    const double mscale = 0.1 * std::log(4.0) + 1.0;
    for (int j = 0; j < 32; ++j) ASSERT_NEAR(q.as<float>()[i * 32 + j], mscale * qr[j], 1e-4 + 1e-4 * std::fabs(qr[j]));
    for (int j = 0; j < 16; ++j) ASSERT_NEAR(k.as<float>()[i * 16 + j], mscale * kr[j], 1e-4 + 1e-4 * std::fabs(kr[j]));
  }
  fs::remove_all(src);
  fs::remove_all(dst);
}

TEST(RetrievalHead, LayerKindAppliesRopeAndFeedsSelection) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE(SeedTrace(seed));
  std::mt19937 rng(seed);
  const ModelConfig target = Target();
  RetrievalHeadConfig c;
  c.kind = RetrievalHeadKind::kLayer;
  c.attn = target;
  c.attn.num_hidden_layers = 1;
  c.target = {"tiny", 97, 48, 8, 2, 8};
  Named w = {{"embed_tokens.weight", RandomF32(rng, {97, 48})},
             {"input_layernorm.weight", RandomF32(rng, {48})},
             {"q_proj.weight", RandomF32(rng, {32, 48})},
             {"k_proj.weight", RandomF32(rng, {16, 48})}};
  const std::string dir = TempDir("layer_head");
  ASSERT_TRUE(SaveRetrievalHead(dir, c, w).ok());
  auto head = RetrievalHead::Load(dir, target, nullptr);
  ASSERT_TRUE(head.ok()) << head.status();
  // RoPE: the rotation at position p equals a hand-rotated copy of the position-0 result.
  Tensor q0 = Tensor::HostEmpty(DType::kF32, {1, 4, 8}), k0 = Tensor::HostEmpty(DType::kF32, {1, 2, 8});
  Tensor q1 = Tensor::HostEmpty(DType::kF32, {1, 4, 8}), k1 = Tensor::HostEmpty(DType::kF32, {1, 2, 8});
  ASSERT_TRUE((*head)->Forward({7}, {0}, Tensor(), &q0, &k0).ok());
  const int32_t pos = 1 + rng() % 3000;
  ASSERT_TRUE((*head)->Forward({7}, {pos}, Tensor(), &q1, &k1).ok());
  for (int hh = 0; hh < 4; ++hh) {
    for (int j = 0; j < 4; ++j) {
      const double ang = pos * std::pow(10000.0, -2.0 * j / 8);
      const float* a = q0.as<float>() + hh * 8;
      EXPECT_NEAR(q1.as<float>()[hh * 8 + j], a[j] * std::cos(ang) - a[j + 4] * std::sin(ang), 1e-4);
      EXPECT_NEAR(q1.as<float>()[hh * 8 + j + 4], a[j + 4] * std::cos(ang) + a[j] * std::sin(ang), 1e-4);
    }
  }
  // Observe a prompt past the cache's first capacity, then select over the past.
  RetrievalKvCache cache(2, 8, 4);
  std::vector<int32_t> prompt(37);
  for (int32_t& t : prompt) t = rng() % 97;
  Tensor qp = Tensor::HostEmpty(DType::kF32, {37, 4, 8});
  ASSERT_TRUE((*head)->Observe(prompt, Tensor(), &cache, &qp).ok());
  EXPECT_EQ(cache.len(), 37);
  Tensor kk = Tensor::HostEmpty(DType::kF32, {1, 2, 8}), qq = Tensor::HostEmpty(DType::kF32, {1, 4, 8});
  ASSERT_TRUE((*head)->Forward({prompt[20]}, {20}, Tensor(), &qq, &kk).ok());
  for (int g = 0; g < 2; ++g)
    for (int e = 0; e < 8; ++e) {
      // Batched and single-row GEMMs round differently, so not bit-exact.
      const float want = kk.as<float>()[g * 8 + e];
      EXPECT_NEAR(cache.k().as<float>()[(g * cache.k().dim(1) + 20) * 8 + e], want, 1e-5f + 1e-5f * std::fabs(want));
    }
  SelectionQuery sq;
  sq.q = *qp.Rows(36, 37).Reshape({4, 8});
  sq.k_cache = cache.k();
  sq.len = cache.len() - 1;
  SelectionOptions so;
  so.budget = 8;
  auto sel = SelectTopB(std::span<const SelectionQuery>(&sq, 1), so);
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ(sel->sets.Positions(0, 1).size(), 8u);
  fs::remove_all(dir);
}

TEST(RetrievalHead, PruneCanStretchRopeWithYarn) {
  std::mt19937 rng(FreshSeed());
  const ModelConfig target = Target();
  const std::string src = TempDir("eagle3_yarn"), dst = TempDir("eagle3_yarn_head");
  WriteEagle3Draft(rng, src, target);
  RopeScaling yarn;
  yarn.type = "yarn";
  yarn.factor = 2.0 + rng() % 14;
  yarn.original_max_position_embeddings = 2048;
  PruneOptions options;
  options.rope_scaling = yarn;
  ASSERT_TRUE(PruneToRetrievalHead(src, RetrievalHeadKind::kEagle3, target, "x", dst, options).ok());
  NamedWeights target_w({{"model.embed_tokens.weight", Bf16(rng, {97, 48})}});
  auto head = RetrievalHead::Load(dst, target, &target_w);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->config().attn.rope_scaling.type, "yarn");
  EXPECT_EQ((*head)->config().attn.rope_scaling.factor, yarn.factor);
  EXPECT_EQ((*head)->config().attn.rope_scaling.original_max_position_embeddings, 2048);
  // At position 0 the rotation is the identity, so q scales by YaRN's mscale = 0.1 ln(factor) + 1.
  Tensor fused = RandomF32(rng, {1, 144});
  Tensor q = Tensor::HostEmpty(DType::kF32, {1, 4, 8}), k = Tensor::HostEmpty(DType::kF32, {1, 2, 8});
  Tensor q4 = Tensor::HostEmpty(DType::kF32, {1, 4, 8});
  ASSERT_TRUE((*head)->Forward({3}, {0}, fused, &q, &k).ok());
  auto base = RetrievalHead::Load(src + "_none", target, &target_w);  // not a head: a clear error
  EXPECT_FALSE(base.ok());
  ASSERT_TRUE(PruneToRetrievalHead(src, RetrievalHeadKind::kEagle3, target, "x", dst).ok());  // factor 4 from source
  auto h4 = RetrievalHead::Load(dst, target, &target_w);
  ASSERT_TRUE(h4.ok()) << h4.status();
  ASSERT_TRUE((*h4)->Forward({3}, {0}, fused, &q4, &k).ok());
  const double ratio = (0.1 * std::log(yarn.factor) + 1.0) / (0.1 * std::log(4.0) + 1.0);
  for (int j = 0; j < 32; ++j) EXPECT_NEAR(q.as<float>()[j], ratio * q4.as<float>()[j], 1e-5 + 1e-4 * std::fabs(q.as<float>()[j]));
  fs::remove_all(src);
  fs::remove_all(dst);
}

TEST(RetrievalHead, BadHeadsGiveClearErrors) {
  std::mt19937 rng(FreshSeed());
  const ModelConfig target = Target();
  const std::string src = TempDir("eagle3_bad"), dst = TempDir("eagle3_bad_head");
  WriteEagle3Draft(rng, src, target);
  ModelConfig other = target;
  other.num_key_value_heads = 4;
  other.num_attention_heads = 8;
  auto r = PruneToRetrievalHead(src, RetrievalHeadKind::kEagle3, other, "x", dst);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("num_key_value_heads"));
  ASSERT_TRUE(PruneToRetrievalHead(src, RetrievalHeadKind::kEagle3, target, "x", dst).ok());
  NamedWeights target_w({{"model.embed_tokens.weight", Bf16(rng, {97, 48})}});
  // The head against a model with another vocabulary / layer count.
  ModelConfig vocab = target;
  vocab.vocab_size = 120;
  EXPECT_THAT(RetrievalHead::Load(dst, vocab, &target_w).status().message(), ::testing::HasSubstr("vocab_size"));
  ModelConfig layers = target;
  layers.num_hidden_layers = 4;
  EXPECT_THAT(RetrievalHead::Load(dst, layers, &target_w).status().message(), ::testing::HasSubstr("num_hidden_layers"));
  // No target embedding to share.
  EXPECT_THAT(RetrievalHead::Load(dst, target, nullptr).status().message(), ::testing::HasSubstr("embedding"));
  // A head written by a future format version.
  {
    std::ifstream in(dst + "/config.json");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = text.find("\"format_version\": 1");
    ASSERT_NE(at, std::string::npos);
    std::string newer = text;
    newer.replace(at, 19, "\"format_version\": 3");
    std::ofstream(dst + "/config.json") << newer;
    EXPECT_THAT(RetrievalHead::Load(dst, target, &target_w).status().message(), ::testing::HasSubstr("format_version"));
    std::ofstream(dst + "/config.json") << text;
    ASSERT_TRUE(RetrievalHead::Load(dst, target, &target_w).ok());
  }
  // A corrupt (truncated) weights file.
  const std::string st = dst + "/model.safetensors";
  const auto size = fs::file_size(st);
  fs::resize_file(st, size / 2);
  auto corrupt = RetrievalHead::Load(dst, target, &target_w);
  EXPECT_FALSE(corrupt.ok());
  EXPECT_THAT(corrupt.status().message(), ::testing::HasSubstr(dst));
  // A config that is not a retrieval head's.
  std::ofstream(dst + "/config.json") << R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 48,
    "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 97,
    "max_position_embeddings": 64})";
  EXPECT_THAT(RetrievalHead::Load(dst, target, &target_w).status().message(),
              ::testing::HasSubstr("specontext_retrieval_head"));
  // A missing tensor / a wrong shape, through Create.
  RetrievalHeadConfig c;
  c.kind = RetrievalHeadKind::kLayer;
  c.attn = target;
  c.target = {"tiny", 97, 48, 8, 2, 8};
  NamedWeights missing({{"embed_tokens.weight", RandomF32(rng, {97, 48})}, {"input_layernorm.weight", RandomF32(rng, {48})},
                         {"q_proj.weight", RandomF32(rng, {32, 48})}});
  EXPECT_THAT(RetrievalHead::Create(c, missing, target, nullptr).status().message(), ::testing::HasSubstr("k_proj.weight"));
  NamedWeights shape({{"embed_tokens.weight", RandomF32(rng, {97, 48})}, {"input_layernorm.weight", RandomF32(rng, {48})},
                       {"q_proj.weight", RandomF32(rng, {32, 48})}, {"k_proj.weight", RandomF32(rng, {17, 48})}});
  EXPECT_THAT(RetrievalHead::Create(c, shape, target, nullptr).status().message(), ::testing::HasSubstr("expected floating [16, 48]"));
  fs::remove_all(src);
  fs::remove_all(dst);
}

}  // namespace
}  // namespace specontext
