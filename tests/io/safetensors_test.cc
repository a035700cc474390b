// safetensors round trips, sharded indexes and mapping lifetime.
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using ::specontext::testing::FreshSeed;
using ::specontext::testing::ScratchDir;
using ::testing::HasSubstr;

// Random bytes for integer dtypes; finite random values for floats (so equality is meaningful).
Tensor RandomTensor(DType dtype, Shape shape, std::mt19937_64& rng) {
  Tensor t = Tensor::HostEmpty(dtype, std::move(shape));
  auto* b = static_cast<uint8_t*>(t.data());
  if (IsFloating(dtype)) {
    std::normal_distribution<float> nd(0.f, 3.f);
    std::vector<float> f(t.numel());
    for (float& x : f) x = nd(rng);
    ConvertFromF32(f.data(), dtype, b, f.size());
  } else {
    for (size_t i = 0; i < t.nbytes(); ++i) b[i] = static_cast<uint8_t>(rng());
  }
  return t;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

TEST(SafetensorsTest, RoundTripEveryDtype) {
  ScratchDir dir;
  std::mt19937_64 rng(FreshSeed());
  std::vector<std::pair<std::string, Tensor>> tensors;
  // Every whole-byte dtype; the packed F4/F6 formats are read only (safetensors_malformed_test).
  const DType dtypes[] = {DType::kF32,  DType::kF16,    DType::kBF16,   DType::kI32,    DType::kI64,
                          DType::kU8,   DType::kBool,   DType::kI8,     DType::kI16,    DType::kU16,
                          DType::kU32,  DType::kU64,    DType::kF64,    DType::kC64,    DType::kF8E4M3,
                          DType::kF8E5M2, DType::kF8E8M0};
  for (DType d : dtypes) {
    tensors.emplace_back(absl::StrCat("t.", std::string(DTypeName(d)), ".a"), RandomTensor(d, {17, 3}, rng));
    tensors.emplace_back(absl::StrCat("t.", std::string(DTypeName(d)), ".b"), RandomTensor(d, {97}, rng));
    tensors.emplace_back(absl::StrCat("t.", std::string(DTypeName(d)), ".c"), RandomTensor(d, {2, 3, 5, 7}, rng));
  }
  tensors.emplace_back("scalar", RandomTensor(DType::kF32, {}, rng));
  tensors.emplace_back("empty", RandomTensor(DType::kF16, {0, 5}, rng));
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "spaces and \"quotes\""}};
  ASSERT_TRUE(WriteSafetensors(dir.Path("a.safetensors"), tensors, meta).ok());

  const std::string bytes = testing::ReadFile(dir.Path("a.safetensors"));
  absl::StatusOr<SafetensorsHeader> h =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->data_start % 8, 0u) << "the data section must start 8-byte aligned";
  EXPECT_EQ(h->metadata, meta);

  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensors(dir.Path("a.safetensors"));
  ASSERT_TRUE(ws.ok()) << ws.status();
  EXPECT_EQ((*ws)->Names().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE((*ws)->Has(name)) << name;
    absl::StatusOr<Tensor> got = (*ws)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(SameBytes(*got, t)) << name << " " << got->DebugString();
  }
  EXPECT_FALSE((*ws)->Has("nope"));
  EXPECT_EQ((*ws)->Get("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, WriterRefusesPackedDtypesByName) {
  ScratchDir dir;
  Tensor f4 = Tensor::HostEmpty(DType::kF4, {4});
  absl::Status s = WriteSafetensors(dir.Path("p.safetensors"), {{"scales", f4}});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("\"scales\" has the packed dtype F4"));
}

TEST(SafetensorsTest, TensorKeepsMappingAlive) {
  ScratchDir dir;
  std::mt19937_64 rng(FreshSeed());
  Tensor t = RandomTensor(DType::kBF16, {31, 9}, rng);
  ASSERT_TRUE(WriteSafetensors(dir.Path("m.safetensors"), {{"w", t}}).ok());
  Tensor view;
  {
    absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensors(dir.Path("m.safetensors"));
    ASSERT_TRUE(ws.ok());
    view = *(*ws)->Get("w");
  }
  std::filesystem::remove(dir.Path("m.safetensors"));  // the mapping outlives the name
  EXPECT_TRUE(SameBytes(view, t));
}

TEST(SafetensorsTest, StreamingWriterMatchesSimpleWriterAcrossThreads) {
  ScratchDir dir;
  std::mt19937_64 rng(FreshSeed());
  std::vector<std::pair<std::string, Tensor>> tensors = {{"a", RandomTensor(DType::kF32, {1001, 7}, rng)},
                                                         {"b", RandomTensor(DType::kBF16, {333}, rng)}};
  ASSERT_TRUE(WriteSafetensors(dir.Path("simple.safetensors"), tensors).ok());
  std::vector<TensorSpec> specs = {{"a", DType::kF32, {1001, 7}}, {"b", DType::kBF16, {333}}};
  auto fill = [&](size_t i, int64_t first, int64_t count, void* dst) {
    const size_t es = DTypeSize(specs[i].dtype);
    std::memcpy(dst, static_cast<uint8_t*>(tensors[i].second.data()) + first * es, count * es);
  };
  ASSERT_TRUE(WriteSafetensorsStreaming(dir.Path("stream.safetensors"), specs, {}, fill, 4, 37).ok());
  EXPECT_EQ(testing::ReadFile(dir.Path("simple.safetensors")), testing::ReadFile(dir.Path("stream.safetensors")));
  specs.push_back(specs[0]);
  EXPECT_THAT(WriteSafetensorsStreaming(dir.Path("dup.safetensors"), specs, {}, fill, 1).message(),
              HasSubstr("duplicate"));
}

class ShardedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(FreshSeed());
    for (int i = 0; i < 5; ++i) tensors_.emplace_back(absl::StrCat("layer.", i), RandomTensor(DType::kF16, {13, i + 1}, rng));
    ASSERT_TRUE(WriteSafetensors(dir_.Path("s1.safetensors"), {tensors_[0], tensors_[1], tensors_[2]}).ok());
    ASSERT_TRUE(WriteSafetensors(dir_.Path("s2.safetensors"), {tensors_[3], tensors_[4]}).ok());
  }
  void WriteIndex(const std::string& weight_map) {
    testing::WriteFile(dir_.Path("model.safetensors.index.json"),
                       absl::StrCat(R"({"metadata": {"total_size": 1}, "weight_map": )", weight_map, "}"));
  }
  ScratchDir dir_;
  std::vector<std::pair<std::string, Tensor>> tensors_;
};

TEST_F(ShardedTest, ReadsAcrossShards) {
  WriteIndex(R"({"layer.0": "s1.safetensors", "layer.1": "s1.safetensors", "layer.2": "s1.safetensors",
                 "layer.3": "s2.safetensors", "layer.4": "s2.safetensors"})");
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json"));
  ASSERT_TRUE(ws.ok()) << ws.status();
  EXPECT_EQ((*ws)->Names().size(), 5u);
  for (const auto& [name, t] : tensors_) {
    absl::StatusOr<Tensor> got = (*ws)->Get(name);
    ASSERT_TRUE(got.ok()) << name;
    EXPECT_TRUE(SameBytes(*got, t)) << name;
  }
}

TEST_F(ShardedTest, TensorMissingFromItsShardIsAnError) {
  WriteIndex(R"({"layer.0": "s1.safetensors", "layer.3": "s1.safetensors"})");
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json"));
  ASSERT_FALSE(ws.ok());
  EXPECT_THAT(ws.status().message(), HasSubstr("layer.3"));
  EXPECT_THAT(ws.status().message(), HasSubstr("missing from shard s1.safetensors"));
}

TEST_F(ShardedTest, MissingShardFileAndBadIndexes) {
  WriteIndex(R"({"layer.0": "s9.safetensors"})");
  EXPECT_EQ(OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json")).status().code(), absl::StatusCode::kNotFound);
  WriteIndex(R"({"layer.0": "../s1.safetensors"})");
  EXPECT_THAT(OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json")).status().message(),
              HasSubstr("not a plain file name"));
  WriteIndex(R"({"layer.0": 3})");
  EXPECT_THAT(OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json")).status().message(),
              HasSubstr("not a string"));
  testing::WriteFile(dir_.Path("model.safetensors.index.json"), R"({"metadata": {}})");
  EXPECT_THAT(OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json")).status().message(),
              HasSubstr("weight_map"));
  // A truncated shard is reported with its path.
  const std::string s2 = testing::ReadFile(dir_.Path("s2.safetensors"));
  testing::WriteFile(dir_.Path("s2.safetensors"), s2.substr(0, s2.size() - 3));
  WriteIndex(R"({"layer.3": "s2.safetensors"})");
  absl::Status st = OpenSafetensorsIndex(dir_.Path("model.safetensors.index.json")).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("s2.safetensors"));
  EXPECT_THAT(st.message(), HasSubstr("past the data section"));
}

}  // namespace
}  // namespace specontext
