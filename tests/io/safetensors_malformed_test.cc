// Each malformed safetensors header is rejected with InvalidArgument and a message naming the problem.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using ::testing::HasSubstr;

// [u64 LE length][header][data_bytes bytes of 0x5a].
std::string Build(const std::string& header, size_t data_bytes, uint64_t declared_len = UINT64_MAX) {
  const uint64_t n = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\x5a');
}

struct Case {
  const char* label;
  std::string file;
  const char* expect;  // substring of the error message
};

class MalformedTest : public ::testing::TestWithParam<Case> {};

TEST_P(MalformedTest, RejectedFromMemoryAndFromFile) {
  const Case& c = GetParam();
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(c.file.data()), c.file.size());
  ASSERT_FALSE(h.ok()) << c.label;
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << h.status();
  EXPECT_THAT(h.status().message(), HasSubstr(c.expect)) << c.label;

  testing::ScratchDir dir;
  const std::string path = dir.Path("bad.safetensors");
  testing::WriteFile(path, c.file);
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenSafetensors(path);
  ASSERT_FALSE(ws.ok());
  EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ws.status().message(), HasSubstr(path)) << "file errors name the file";
  EXPECT_THAT(ws.status().message(), HasSubstr(c.expect));
}

const std::string kOk = R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";

INSTANTIATE_TEST_SUITE_P(
    Headers, MalformedTest,
    ::testing::Values(
        Case{"empty file", "", "shorter than the 8-byte"},
        Case{"7 bytes", std::string(7, '\0'), "shorter than the 8-byte"},
        Case{"absurd header length", Build("{}", 0, 200ull * 1000 * 1000), "absurd"},
        Case{"header past EOF", Build("{}", 0, 64), "past the end of the file"},
        Case{"not JSON", Build("{\"w\": [", 0), "not valid JSON"},
        Case{"not an object", Build("[1, 2]", 0), "not a JSON object"},
        Case{"entry not an object", Build(R"({"w": 3})", 0), "not an object"},
        Case{"missing dtype", Build(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing \"dtype\""},
        Case{"missing shape", Build(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8), "missing \"shape\""},
        Case{"missing offsets", Build(R"({"w":{"dtype":"F32","shape":[2]}})", 8), "missing \"data_offsets\""},
        Case{"unknown dtype", Build(R"({"w":{"dtype":"F7_E3M3","shape":[2],"data_offsets":[0,2]}})", 2),
             "unsupported safetensors dtype \"F7_E3M3\""},
        Case{"packed dtype not whole bytes", Build(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2),
             "3 elements of F4 do not fill whole bytes"},
        Case{"packed dtype size mismatch", Build(R"({"w":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,4]}})", 4),
             "needs 4 x 6 bits = 3 bytes but data_offsets span 4"},
        Case{"negative dim", Build(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
             "negative or non-integer"},
        Case{"fractional dim", Build(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
             "negative or non-integer"},
        Case{"string dim", Build(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8),
             "negative or non-integer"},
        Case{"size mismatch", Build(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24),
             "data_offsets span 20"},
        Case{"offsets past end", Build("{" + kOk + "}", 23), "past the data section"},
        Case{"begin > end", Build(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 8), "begin 8 > end 4"},
        Case{"one offset", Build(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[4]}})", 8), "two non-negative"},
        Case{"overlap", Build(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
                                  "b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}})", 28), "overlap"},
        Case{"huge shape", Build(R"({"w":{"dtype":"F32","shape":[281474976710656,281474976710656],"data_offsets":[0,8]}})", 8),
             "too large"},
        Case{"metadata not object", Build(R"({"__metadata__": [1], )" + kOk + "}", 24), "__metadata__ is not an object"},
        Case{"metadata value not string", Build(R"({"__metadata__": {"a": 1}, )" + kOk + "}", 24),
             "__metadata__ value of \"a\""}),
    [](const ::testing::TestParamInfo<Case>& info) {
      std::string s = info.param.label;
      for (char& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return s;
    });

// Every dtype of the safetensors list parses with its element width (huggingface/safetensors
// safetensors/src/tensor.rs `Dtype::bitsize`): one BOOL t2d mask must not make a draft unreadable.
TEST(SafetensorsParseTest, EveryDtypeOfTheFormatParses) {
  struct Want {
    const char* name;
    DType dtype;
    int bits;
  };
  const Want wants[] = {{"BOOL", DType::kBool, 8},       {"U8", DType::kU8, 8},           {"I8", DType::kI8, 8},
                        {"I16", DType::kI16, 16},        {"U16", DType::kU16, 16},        {"I32", DType::kI32, 32},
                        {"U32", DType::kU32, 32},        {"I64", DType::kI64, 64},        {"U64", DType::kU64, 64},
                        {"F16", DType::kF16, 16},        {"BF16", DType::kBF16, 16},      {"F32", DType::kF32, 32},
                        {"F64", DType::kF64, 64},        {"C64", DType::kC64, 64},        {"F8_E4M3", DType::kF8E4M3, 8},
                        {"F8_E5M2", DType::kF8E5M2, 8},  {"F8_E8M0", DType::kF8E8M0, 8},  {"F4", DType::kF4, 4},
                        {"F6_E2M3", DType::kF6E2M3, 6},  {"F6_E3M2", DType::kF6E3M2, 6}};
  std::string header = "{";
  uint64_t offset = 0;
  for (const Want& w : wants) {
    const uint64_t bytes = 4 * static_cast<uint64_t>(w.bits) / 8;  // 4 elements each: whole bytes for all
    if (header.size() > 1) header += ",";
    header += absl::StrCat("\"t_", w.name, "\":{\"dtype\":\"", w.name, "\",\"shape\":[2,2],\"data_offsets\":[", offset,
                           ",", offset + bytes, "]}");
    offset += bytes;
  }
  header += "}";
  const std::string file = Build(header, offset);
  absl::StatusOr<std::unique_ptr<WeightSource>> ws =
      SafetensorsFromBuffer(reinterpret_cast<const uint8_t*>(file.data()), file.size(), nullptr);
  ASSERT_TRUE(ws.ok()) << ws.status();
  for (const Want& w : wants) {
    absl::StatusOr<Tensor> t = (*ws)->Get(absl::StrCat("t_", w.name));
    ASSERT_TRUE(t.ok()) << w.name << ": " << t.status();
    EXPECT_EQ(t->dtype(), w.dtype) << w.name;
    EXPECT_EQ(DTypeBits(w.dtype), w.bits) << w.name;
    EXPECT_EQ(SafetensorsDTypeName(w.dtype), w.name);
    EXPECT_EQ(t->nbytes(), 4u * w.bits / 8) << w.name;
    EXPECT_EQ(t->shape(), Shape({2, 2}));
  }
}

TEST(SafetensorsParseTest, AcceptsWellFormedHeaderWithPaddingAndGaps) {
  // Space padding after the JSON (HF writers pad to 8 bytes) and unused bytes between tensors are fine.
  const std::string file = Build(R"({"a":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}})" + std::string(5, ' '), 16);
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(file.data()), file.size());
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors.size(), 1u);
  EXPECT_EQ(h->tensors[0].dtype, DType::kBF16);
  EXPECT_EQ(h->tensors[0].shape, Shape({3}));
  EXPECT_EQ(h->data_size, 16u);
}

}  // namespace
}  // namespace specontext
