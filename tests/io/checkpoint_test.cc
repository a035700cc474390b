// OpenCheckpoint over random checkpoints from the generator library: presets, shards, broken variants.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>

#include "absl/strings/str_cat.h"
#include "core/io/torch_zip_writer.h"
#include "core/io/weight_source.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct Stats {
  double mean = 0, std = 0;
};
Stats StatsOf(const Tensor& t) {
  std::vector<float> f(t.numel());
  ConvertToF32(t.data(), t.dtype(), f.data(), f.size());
  double s = 0, s2 = 0;
  for (float x : f) {
    s += x;
    s2 += double{x} * x;
  }
  const double n = static_cast<double>(f.size());
  return {s / n, std::sqrt(std::max(0.0, s2 / n - (s / n) * (s / n)))};
}

class PresetTest : public ::testing::TestWithParam<std::tuple<std::string, DType>> {};

TEST_P(PresetTest, WritesAndOpens) {
  const auto& [preset, dtype] = GetParam();
  testing::ScratchDir dir;
  absl::StatusOr<ModelConfig> cfg = RandomCheckpointPreset(preset);
  ASSERT_TRUE(cfg.ok());
  RandomCheckpointOptions opt;
  opt.dtype = dtype;
  opt.seed = testing::FreshSeed();
  ASSERT_TRUE(WriteRandomCheckpoint(*cfg, dir.path().string(), opt).ok());
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(dir.path().string());
  ASSERT_TRUE(ck.ok()) << ck.status();
  const ModelConfig& c = ck->config;
  EXPECT_EQ(c.arch, cfg->arch);
  EXPECT_EQ(c.vocab_size, cfg->vocab_size);
  EXPECT_EQ(c.head_dim, cfg->head_dim);
  EXPECT_EQ(c.num_key_value_heads, cfg->num_key_value_heads);
  EXPECT_EQ(c.tie_word_embeddings, cfg->tie_word_embeddings);
  EXPECT_EQ(c.attention_bias, cfg->attention_bias);
  EXPECT_EQ(c.qk_norm, cfg->qk_norm);
  EXPECT_EQ(c.rope_scaling.type, cfg->rope_scaling.type);
  EXPECT_EQ(ck->generation.eos_token_ids, cfg->eos_token_ids);
  EXPECT_EQ(ck->tokenizer_path, dir.Path("tokenizer.json"));
  EXPECT_TRUE(fs::exists(dir.Path("tokenizer_config.json")));
  // A file inside the directory opens the directory.
  absl::StatusOr<Checkpoint> via_file = OpenCheckpoint(dir.Path("config.json"));
  ASSERT_TRUE(via_file.ok()) << via_file.status();
  EXPECT_EQ(via_file->weights->Names().size(), ck->weights->Names().size());
  EXPECT_EQ(ck->weights->Names().size(), ExpectedTensors(c).size());
  for (const ExpectedTensor& e : ExpectedTensors(c)) {
    const Tensor t = *ck->weights->Get(e.name);
    EXPECT_EQ(t.dtype(), dtype) << e.name;
    const Stats s = StatsOf(t);
    if (e.name.find("norm") != std::string::npos) {
      EXPECT_NEAR(s.mean, 1.0, 0.03) << e.name;
      EXPECT_GT(s.std, 0.01) << e.name << " norms carry noise";
    } else if (t.numel() >= 4096) {
      EXPECT_NEAR(s.mean, 0.0, 0.003) << e.name;
      EXPECT_NEAR(s.std, 0.02, 0.002) << e.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Tiny, PresetTest,
    ::testing::Combine(::testing::Values("tiny-llama", "tiny-llama-tied-gqa", "tiny-qwen2", "tiny-qwen3", "tiny-mqa"),
                       ::testing::Values(DType::kBF16, DType::kF16, DType::kF32)),
    [](const auto& info) {
      std::string s = absl::StrCat(std::get<0>(info.param), "_", std::string(DTypeName(std::get<1>(info.param))));
      for (char& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return s;
    });

TEST(RandomCheckpointTest, DeterministicInSeedShardedOrNotAnyThreads) {
  testing::ScratchDir dir;
  const ModelConfig cfg = *RandomCheckpointPreset("tiny-qwen3");
  RandomCheckpointOptions opt;
  opt.seed = testing::FreshSeed();
  opt.num_threads = 1;
  ASSERT_TRUE(WriteRandomCheckpoint(cfg, dir.Path("single"), opt).ok());
  opt.num_threads = 3;
  opt.shard_size_bytes = 40000;
  ASSERT_TRUE(WriteRandomCheckpoint(cfg, dir.Path("sharded"), opt).ok());
  opt.seed += 1;
  ASSERT_TRUE(WriteRandomCheckpoint(cfg, dir.Path("other"), opt).ok());
  EXPECT_FALSE(fs::exists(dir.Path("single/model.safetensors.index.json")));
  ASSERT_TRUE(fs::exists(dir.Path("sharded/model.safetensors.index.json")));
  EXPECT_FALSE(fs::exists(dir.Path("sharded/model.safetensors")));
  int shards = 0;
  for (const auto& e : fs::directory_iterator(dir.Path("sharded"))) shards += e.path().extension() == ".safetensors";
  EXPECT_GT(shards, 3);

  absl::StatusOr<Checkpoint> a = OpenCheckpoint(dir.Path("single"));
  absl::StatusOr<Checkpoint> b = OpenCheckpoint(dir.Path("sharded"));
  absl::StatusOr<Checkpoint> o = OpenCheckpoint(dir.Path("other"));
  ASSERT_TRUE(a.ok() && b.ok() && o.ok()) << b.status();
  for (const std::string& name : a->weights->Names()) {
    const Tensor ta = *a->weights->Get(name), tb = *b->weights->Get(name), to = *o->weights->Get(name);
    EXPECT_EQ(std::memcmp(ta.data(), tb.data(), ta.nbytes()), 0) << name;
    EXPECT_NE(std::memcmp(ta.data(), to.data(), ta.nbytes()), 0) << name << " must change with the seed";
  }
  // Rewriting unsharded into the sharded directory removes the stale index and shards.
  opt.shard_size_bytes = 1ull << 30;
  ASSERT_TRUE(WriteRandomCheckpoint(cfg, dir.Path("sharded"), opt).ok());
  EXPECT_FALSE(fs::exists(dir.Path("sharded/model.safetensors.index.json")));
  EXPECT_TRUE(OpenCheckpoint(dir.Path("sharded")).ok());
}

// A target model saved with torch.save (pytorch_model.bin, as save_pretrained(safe_serialization=False)
// writes it) opens with the same tensors as its safetensors twin.
TEST(CheckpointTest, TorchSaveDirectoryOpensLikeSafetensors) {
  testing::ScratchDir dir;
  RandomCheckpointOptions opt;
  opt.seed = testing::FreshSeed();
  ASSERT_TRUE(WriteRandomCheckpoint(*RandomCheckpointPreset("tiny-qwen2"), dir.Path("st"), opt).ok());
  absl::StatusOr<Checkpoint> st = OpenCheckpoint(dir.Path("st"));
  ASSERT_TRUE(st.ok()) << st.status();
  fs::create_directories(dir.Path("bin"));
  fs::copy_file(dir.Path("st/config.json"), dir.Path("bin/config.json"));
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : st->weights->Names()) tensors.emplace_back(name, *st->weights->Get(name));
  ASSERT_TRUE(WriteTorchCheckpoint(dir.Path("bin/pytorch_model.bin"), tensors).ok());
  absl::StatusOr<Checkpoint> bin = OpenCheckpoint(dir.Path("bin"));
  ASSERT_TRUE(bin.ok()) << bin.status();
  for (const auto& [name, t] : tensors) {
    const Tensor b = *bin->weights->Get(name);
    ASSERT_EQ(b.shape(), t.shape()) << name;
    EXPECT_EQ(std::memcmp(b.data(), t.data(), t.nbytes()), 0) << name;
  }
}

// A broken variant of a tiny preset: `edit` tampers with the tensor list, `expect` is in the error.
struct Variant {
  const char* label;
  const char* preset;
  std::function<void(std::vector<TensorSpec>*)> edit;
  std::vector<const char*> expect;
};

class BrokenCheckpointTest : public ::testing::TestWithParam<Variant> {};

TEST_P(BrokenCheckpointTest, Rejected) {
  testing::ScratchDir dir;
  RandomCheckpointOptions opt;
  opt.seed = 7;
  opt.edit_specs = GetParam().edit;
  ASSERT_TRUE(WriteRandomCheckpoint(*RandomCheckpointPreset(GetParam().preset), dir.path().string(), opt).ok());
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(dir.path().string());
  ASSERT_FALSE(ck.ok()) << GetParam().label;
  EXPECT_EQ(ck.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* s : GetParam().expect) EXPECT_THAT(ck.status().message(), HasSubstr(s));
}

void Drop(std::vector<TensorSpec>* specs, const std::string& name) {
  std::erase_if(*specs, [&](const TensorSpec& s) { return s.name == name; });
}
TensorSpec& Find(std::vector<TensorSpec>* specs, const std::string& name) {
  for (TensorSpec& s : *specs) {
    if (s.name == name) return s;
  }
  ADD_FAILURE() << "no " << name;
  return specs->front();
}

INSTANTIATE_TEST_SUITE_P(
    Variants, BrokenCheckpointTest,
    ::testing::Values(
        Variant{"q_proj transposed", "tiny-qwen3",
                [](auto* s) { Find(s, "model.layers.1.self_attn.q_proj.weight").shape = {64, 128}; },
                {"model.layers.1.self_attn.q_proj.weight", "[64, 128]", "[128, 64]"}},
        Variant{"down_proj wrong", "tiny-llama",
                [](auto* s) { Find(s, "model.layers.0.mlp.down_proj.weight").shape = {64, 161}; },
                {"down_proj", "[64, 161]", "[64, 160]"}},
        Variant{"embed wrong vocab", "tiny-mqa",
                [](auto* s) { Find(s, "model.embed_tokens.weight").shape = {319, 64}; }, {"embed_tokens", "[320, 64]"}},
        Variant{"missing k_norm", "tiny-qwen3", [](auto* s) { Drop(s, "model.layers.1.self_attn.k_norm.weight"); },
                {"missing tensor \"model.layers.1.self_attn.k_norm.weight\"", "[32]"}},
        Variant{"missing bias", "tiny-qwen2", [](auto* s) { Drop(s, "model.layers.0.self_attn.v_proj.bias"); },
                {"v_proj.bias"}},
        Variant{"missing lm_head", "tiny-llama", [](auto* s) { Drop(s, "lm_head.weight"); }, {"lm_head.weight"}},
        Variant{"missing final norm", "tiny-llama-tied-gqa", [](auto* s) { Drop(s, "model.norm.weight"); },
                {"model.norm.weight"}},
        Variant{"renamed layer", "tiny-llama",
                [](auto* s) { Find(s, "model.layers.1.mlp.up_proj.weight").name = "model.layers.1.mlp.up.weight"; },
                {"model.layers.1.mlp.up_proj.weight"}},
        Variant{"integer weight", "tiny-mqa",
                [](auto* s) {
                  TensorSpec& t = Find(s, "model.layers.0.self_attn.o_proj.weight");
                  t.dtype = DType::kI32;
                },
                {"o_proj", "dtype i32"}}),
    [](const auto& info) {
      std::string s = info.param.label;
      for (char& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return s;
    });

TEST(OpenCheckpointTest, MissingPiecesGiveClearErrors) {
  testing::ScratchDir dir;
  EXPECT_EQ(OpenCheckpoint(dir.Path("nowhere")).status().code(), absl::StatusCode::kNotFound);
  fs::create_directories(dir.Path("empty"));
  EXPECT_THAT(OpenCheckpoint(dir.Path("empty")).status().message(), HasSubstr("no config.json"));

  RandomCheckpointOptions opt;
  opt.seed = 11;
  ASSERT_TRUE(WriteRandomCheckpoint(*RandomCheckpointPreset("tiny-llama"), dir.Path("ck"), opt).ok());
  const std::string st = testing::ReadFile(dir.Path("ck/model.safetensors"));
  testing::WriteFile(dir.Path("ck/model.safetensors"), st.substr(0, st.size() - 100));
  absl::Status s = OpenCheckpoint(dir.Path("ck")).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.safetensors"));

  fs::remove(dir.Path("ck/model.safetensors"));
  EXPECT_THAT(OpenCheckpoint(dir.Path("ck")).status().message(),
              HasSubstr("holds no weights: looked for model.safetensors, model.safetensors.index.json, "
                        "pytorch_model.bin, pytorch_model.bin.index.json"));

  testing::WriteFile(dir.Path("ck/config.json"), R"({"architectures": ["GPT2LMHeadModel"]})");
  EXPECT_THAT(OpenCheckpoint(dir.Path("ck")).status().message(), HasSubstr("unsupported architecture"));
}

// OpenCheckpoint(path)'s status when it returns within 10 s. A call still blocked then (in open or
// read of one of `fifos`) is released by opening those FIFOs for writing, so a regression fails the
// test instead of hanging it.
absl::Status OpenWithinTimeout(const std::string& path, const std::vector<std::string>& fifos) {
  std::future<absl::Status> done =
      std::async(std::launch::async, [path] { return OpenCheckpoint(path).status(); });
  if (done.wait_for(std::chrono::seconds(10)) == std::future_status::ready) return done.get();
  while (done.wait_for(std::chrono::milliseconds(50)) != std::future_status::ready) {
    for (const std::string& f : fifos) {
      const int fd = ::open(f.c_str(), O_WRONLY | O_NONBLOCK);  // ENXIO while no reader waits
      if (fd >= 0) ::close(fd);
    }
  }
  return absl::DeadlineExceededError(absl::StrCat("OpenCheckpoint(", path, ") blocked for 10 s"));
}

TEST(OpenCheckpointTest, RefusesFifosAndDevicesWithoutBlocking) {
  testing::ScratchDir dir;
  const std::string fifo = dir.Path("model.bin");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  absl::Status s = OpenWithinTimeout(fifo, {fifo});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("FIFO"));
  EXPECT_THAT(s.message(), HasSubstr(fifo));

  const std::string gguf_fifo = dir.Path("model.gguf");
  ASSERT_EQ(::mkfifo(gguf_fifo.c_str(), 0600), 0);
  s = OpenWithinTimeout(gguf_fifo, {gguf_fifo});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;

  s = OpenWithinTimeout("/dev/null", {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("character device"));

  // A FIFO in place of a file of an HF directory: refused where that file is opened.
  RandomCheckpointOptions opt;
  opt.seed = testing::FreshSeed();
  for (const char* name : {"config.json", "model.safetensors"}) {
    SCOPED_TRACE(name);
    const std::string ck = dir.Path(absl::StrCat("ck_", name));
    ASSERT_TRUE(WriteRandomCheckpoint(*RandomCheckpointPreset("tiny-llama"), ck, opt).ok());
    const std::string inner = ck + "/" + name;
    fs::remove(inner);
    ASSERT_EQ(::mkfifo(inner.c_str(), 0600), 0);
    s = OpenWithinTimeout(ck, {inner});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr("not a regular file"));
  }
}

TEST(PresetConfigTest, RealShapesAndParameterCounts) {
  auto params = [](const ModelConfig& c) {
    int64_t n = 0;
    for (const ExpectedTensor& e : ExpectedTensors(c)) n += NumElements(e.shape);
    return n;
  };
  // Published parameter counts of the real models.
  EXPECT_EQ(params(*RandomCheckpointPreset("llama-3.1-8b")), 8030261248);
  EXPECT_EQ(params(*RandomCheckpointPreset("deepseek-r1-distill-llama-8b")), 8030261248);
  EXPECT_EQ(params(*RandomCheckpointPreset("llama-3.2-1b")), 1235814400);
  EXPECT_EQ(params(*RandomCheckpointPreset("qwen3-8b")), 8190735360);
  const ModelConfig l = *RandomCheckpointPreset("llama-3.1-8b");
  EXPECT_EQ(l.rope_scaling.type, "llama3");
  EXPECT_EQ(l.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(l.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(RandomCheckpointPreset("llama-3.2-1b")->rope_scaling.factor, 32.0);
  const ModelConfig q = *RandomCheckpointPreset("tiny-qwen3");
  EXPECT_NE(q.q_dim(), q.hidden_size) << "tiny-qwen3 must exercise head_dim != hidden/heads";
  EXPECT_EQ(RandomCheckpointPreset("tiny-mqa")->num_key_value_heads, 1);
  for (const std::string& name : RandomCheckpointPresetNames()) {
    const ModelConfig c = *RandomCheckpointPreset(name);
    EXPECT_TRUE(ParseModelConfig(ModelConfigToJson(c)).ok()) << name;
  }
  EXPECT_THAT(RandomCheckpointPreset("llama-9").status().message(), HasSubstr("tiny-qwen2"));
}

TEST(RandomCheckpointTest, RejectsBadOptions) {
  testing::ScratchDir dir;
  RandomCheckpointOptions opt;
  opt.dtype = DType::kI32;
  EXPECT_FALSE(WriteRandomCheckpoint(*RandomCheckpointPreset("tiny-llama"), dir.Path("a"), opt).ok());
  opt = {};
  opt.tokenizer_vocab = 100000;
  EXPECT_THAT(WriteRandomCheckpoint(*RandomCheckpointPreset("tiny-llama"), dir.Path("a"), opt).message(),
              HasSubstr("tokenizer vocab"));
  ModelConfig bad = *RandomCheckpointPreset("tiny-llama");
  bad.num_key_value_heads = 3;
  EXPECT_THAT(WriteRandomCheckpoint(bad, dir.Path("a"), {}).message(), HasSubstr("num_key_value_heads"));
}

}  // namespace
}  // namespace specontext
