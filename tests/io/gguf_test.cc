// The GGUF parser: every metadata type, tensor infos and alignment, and one test per rejection
// class of malformed files (each must fail with InvalidArgument/Unimplemented naming the problem,
// never crash).
#include "core/io/gguf.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/gguf_writer.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using testing::GgufArray;
using testing::GgufStr;
using testing::GgufWriter;
using ::testing::HasSubstr;
using testing::PutLE;

absl::StatusOr<GgufFile> Parse(const std::string& bytes) {
  return ParseGguf(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

// Expects `bytes` to be refused with InvalidArgument whose message contains `needle`.
void ExpectRejected(const std::string& bytes, const std::string& needle,
                    absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  absl::StatusOr<GgufFile> f = Parse(bytes);
  ASSERT_FALSE(f.ok()) << "accepted; wanted an error containing: " << needle;
  EXPECT_EQ(f.status().code(), code) << f.status();
  EXPECT_THAT(f.status().message(), HasSubstr(needle));
}

std::string Le(uint64_t v, int n) {
  std::string s;
  PutLE(s, v, n);
  return s;
}

TEST(Gguf, ParsesEveryMetadataType) {
  GgufWriter w;
  w.Int("u8", GgufType::kU8, 200, 1)
      .Int("i8", GgufType::kI8, 0x80, 1)
      .Int("u16", GgufType::kU16, 60000, 2);
  w.Int("i16", GgufType::kI16, 0x8000, 2).U32("u32", 4000000000u).I32("i32", -7);
  w.U64("u64", 1ull << 63).Int("i64", GgufType::kI64, static_cast<uint64_t>(-5), 8);
  w.F32("f32", 0.5f).F64("f64", -1e300).Bool("t", true).Bool("f", false).Str("s", "héllo");
  w.Strings("strs", {"a", "", "ccc"}).I32s("ints", {1, -2, 3}).F32s("floats", {1.5f, -0.25f});
  w.Raw("bools", GgufType::kArray, GgufArray(GgufType::kBool, 2, std::string("\x01\x00", 2)));
  w.Raw("u64s", GgufType::kArray, GgufArray(GgufType::kU64, 1, Le(9, 8)));
  w.Raw("empty", GgufType::kArray, GgufArray(GgufType::kString, 0, ""));
  // [[1, 2], [3]] of i16 and [["x"], []] of strings.
  const std::string ints =
      GgufArray(GgufType::kI16, 2, Le(1, 2) + Le(2, 2)) + GgufArray(GgufType::kI16, 1, Le(3, 2));
  w.Raw("nested", GgufType::kArray, GgufArray(GgufType::kArray, 2, ints));
  const std::string strs =
      GgufArray(GgufType::kString, 1, GgufStr("x")) + GgufArray(GgufType::kString, 0, "");
  w.Raw("nested_str", GgufType::kArray, GgufArray(GgufType::kArray, 2, strs));
  absl::StatusOr<GgufFile> f = Parse(w.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version, 3u);
  EXPECT_EQ(f->metadata.size(), 21u);
  EXPECT_EQ(f->Find("u8")->AsInt(), 200);
  EXPECT_EQ(f->Find("i8")->AsInt(), -128);
  EXPECT_EQ(f->Find("u16")->AsInt(), 60000);
  EXPECT_EQ(f->Find("i16")->AsInt(), -32768);
  EXPECT_EQ(f->Find("u32")->AsInt(), 4000000000);
  EXPECT_EQ(f->Find("i32")->AsInt(), -7);
  EXPECT_EQ(f->Find("u64")->u, 1ull << 63);
  EXPECT_FALSE(f->Find("u64")->AsInt().has_value());  // above INT64_MAX
  EXPECT_EQ(f->Find("i64")->AsInt(), -5);
  EXPECT_EQ(f->Find("f32")->AsDouble(), 0.5);
  EXPECT_EQ(f->Find("f64")->f, -1e300);
  EXPECT_EQ(f->Find("t")->i, 1);
  EXPECT_EQ(f->Find("f")->type, GgufType::kBool);
  EXPECT_EQ(f->Find("s")->str, "héllo");
  const GgufValue* strs_v = f->Find("strs");
  ASSERT_EQ(strs_v->strings.size(), 3u);
  EXPECT_EQ(strs_v->strings[2], "ccc");
  const GgufValue* ints_v = f->Find("ints");
  EXPECT_EQ(ints_v->elem_type, GgufType::kI32);
  EXPECT_EQ(ints_v->Element(1).AsInt(), -2);
  EXPECT_EQ(f->Find("floats")->Element(1).f, -0.25);
  EXPECT_EQ(f->Find("bools")->Element(0).i, 1);
  EXPECT_EQ(f->Find("u64s")->Element(0).AsInt(), 9);
  EXPECT_EQ(f->Find("empty")->count, 0u);
  const GgufValue* nested = f->Find("nested");
  ASSERT_EQ(nested->items.size(), 2u);
  EXPECT_EQ(nested->items[0].Element(1).AsInt(), 2);
  EXPECT_EQ(nested->items[1].Element(0).AsInt(), 3);
  ASSERT_EQ(f->Find("nested_str")->items.size(), 2u);
  EXPECT_EQ(f->Find("nested_str")->items[0].strings[0], "x");
  EXPECT_EQ(f->Find("absent"), nullptr);
}

TEST(Gguf, TensorInfosAndAlignment) {
  GgufWriter w;
  w.alignment = 64;
  w.U32("general.alignment", 64);
  w.FloatTensor("a", GgmlType::kF32, {3}, {1, 2, 3});
  w.Tensor("q", GgmlType::kQ8_0, {64, 2}, std::string(4 * 34, '\x01'));
  w.FloatTensor("h", GgmlType::kF16, {2, 1, 1, 2}, {1, 2, 3, 4});
  const std::string bytes = w.Build();
  absl::StatusOr<GgufFile> f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->alignment, 64u);
  EXPECT_EQ(f->data_start % 64, 0u);
  ASSERT_EQ(f->tensors.size(), 3u);
  const GgufTensorInfo* q = f->FindTensor("q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::kQ8_0);
  EXPECT_EQ(q->n_dims, 2u);
  EXPECT_EQ(q->ne[0], 64);
  EXPECT_EQ(q->ne[1], 2);
  EXPECT_EQ(q->offset, 64u);
  EXPECT_EQ(q->nbytes, 4u * 34);
  EXPECT_EQ(q->row_bytes(), 2u * 34);
  EXPECT_EQ(f->FindTensor("h")->numel(), 4);
  float a[3];
  std::memcpy(a, f->TensorData(*f->FindTensor("a")), 12);
  EXPECT_EQ(a[2], 3.0f);
  EXPECT_EQ(f->TensorData(*f->FindTensor("h")) + 8,
            reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size());
}

TEST(Gguf, Version2AndFilesOnDisk) {
  GgufWriter w;
  w.version = 2;
  w.Str("general.architecture", "llama").FloatTensor("x", GgmlType::kF32, {2}, {1, 2});
  testing::ScratchDir dir;
  testing::WriteFile(dir.Path("m.gguf"), w.Build());
  EXPECT_TRUE(FileHasGgufMagic(dir.Path("m.gguf")));
  absl::StatusOr<GgufFile> f = OpenGguf(dir.Path("m.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version, 2u);
  EXPECT_NE(f->storage, nullptr);
  testing::WriteFile(dir.Path("bad.gguf"), "GGUF\x03");
  absl::StatusOr<GgufFile> bad = OpenGguf(dir.Path("bad.gguf"));
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr(dir.Path("bad.gguf") + ": gguf: truncated header"));
  EXPECT_FALSE(FileHasGgufMagic(dir.Path("missing.gguf")));
}

TEST(GgufRejects, WrongMagicVersionsAndEndianness) {
  ExpectRejected("GGML\x03\0\0\0", "not a GGUF file");
  ExpectRejected("", "not a GGUF file");
  GgufWriter w;
  w.version = 1;
  ExpectRejected(w.Build(), "version 1 is not supported", absl::StatusCode::kUnimplemented);
  w.version = 0x03000000;  // 3 written big-endian
  ExpectRejected(w.Build(), "big-endian", absl::StatusCode::kUnimplemented);
  w.version = 4;
  ExpectRejected(w.Build(), "unsupported GGUF version 4", absl::StatusCode::kUnimplemented);
}

TEST(GgufRejects, EveryTruncation) {
  GgufWriter w;
  w.U32("general.alignment", 32).Str("name", "tiny").Strings("list", {"a", "bc"});
  w.FloatTensor("t", GgmlType::kF32, {4}, {1, 2, 3, 4});
  const std::string full = w.Build();
  ASSERT_TRUE(Parse(full).ok());
  for (size_t n = 0; n < full.size(); ++n) {
    EXPECT_FALSE(Parse(full.substr(0, n)).ok()) << "prefix of " << n << " bytes accepted";
  }
  ExpectRejected(full.substr(0, 10), "truncated header");
}

TEST(GgufRejects, LyingCounts) {
  GgufWriter w;
  w.U32("a", 1);
  w.claimed_kv = 2;  // one more than written
  ExpectRejected(w.Build(), "claims 2 key/values");
  w.claimed_kv = -1;
  w.claimed_tensors = int64_t{1} << 60;
  ExpectRejected(w.Build(), "claims 1152921504606846976 tensors");
  GgufWriter k;
  k.U32("key_number_1", 1).U32("key_number_2", 2).U32("key_number_3", 3);
  k.claimed_kv =
      4;  // within what the bytes could hold, so only reading the missing 4th entry fails
  ExpectRejected(k.Build(), "key/value #3 key: truncated string length");
}

TEST(GgufRejects, HugeArrayCounts) {
  GgufWriter w;
  w.Raw("big", GgufType::kArray, GgufArray(GgufType::kU64, uint64_t{1} << 61, Le(1, 8)));
  ExpectRejected(w.Build(), "metadata key \"big\": array of 2305843009213693952 u64 elements");
  GgufWriter s;
  s.Raw("strs", GgufType::kArray, GgufArray(GgufType::kString, uint64_t{1} << 40, GgufStr("x")));
  ExpectRejected(s.Build(), "array of 1099511627776 string elements");
  GgufWriter n;
  n.Raw("nested", GgufType::kArray, GgufArray(GgufType::kArray, 1000, ""));
  ExpectRejected(n.Build(), "array of 1000 array elements");
}

TEST(GgufRejects, StringLengthPastEnd) {
  GgufWriter w;
  w.Raw("s", GgufType::kString, Le(1000, 8) + "abc");
  ExpectRejected(w.Build(), "metadata key \"s\": string length 1000 runs past the end");
  GgufWriter k;
  k.Raw("", GgufType::kU8, std::string(1, '\0'));
  std::string bytes = k.Build();
  bytes.replace(24, 8, Le(uint64_t{1} << 62, 8));  // the first key's length
  ExpectRejected(bytes, "key/value #0 key: string length 4611686018427387904 exceeds the limit");
  GgufWriter a;
  a.Raw("strs", GgufType::kArray, GgufArray(GgufType::kString, 2, GgufStr("ok") + Le(99, 8) + "x"));
  ExpectRejected(a.Build(), "metadata key \"strs\"[1]: string length 99 runs past the end");
}

TEST(GgufRejects, BadAlignment) {
  for (uint32_t bad : {0u, 48u}) {
    GgufWriter w;
    w.U32("general.alignment", bad);
    ExpectRejected(w.Build(), absl::StrCat("general.alignment ", bad, " is not a power of two"));
  }
  GgufWriter t;
  t.U64("general.alignment", 32);
  ExpectRejected(t.Build(), "general.alignment must be a u32, not u64");
  GgufWriter o;
  o.FloatTensor("a", GgmlType::kF32, {8}, std::vector<float>(8)).WithOffset(4);
  ExpectRejected(o.Build(), "tensor \"a\": offset 4 is not a multiple of the alignment 32");
}

TEST(GgufRejects, TensorOutsideTheFile) {
  GgufWriter w;
  w.FloatTensor("a", GgmlType::kF32, {8}, std::vector<float>(8)).WithOffset(64);
  ExpectRejected(w.Build(),
                 "tensor \"a\": data [64, 64 + 32) lies outside the data section (32 bytes)");
  GgufWriter e;
  e.FloatTensor("a", GgmlType::kF32, {8}, std::vector<float>(8)).WithOffset(uint64_t{1} << 63);
  ExpectRejected(e.Build(), "lies outside the data section");
  GgufWriter o;
  o.FloatTensor("a", GgmlType::kF32, {16}, std::vector<float>(16));
  o.FloatTensor("b", GgmlType::kF32, {8}, std::vector<float>(8)).WithOffset(32);
  ExpectRejected(o.Build(), "tensors \"a\" and \"b\" overlap");
}

TEST(GgufRejects, OverflowingDims) {
  GgufWriter w;
  w.Tensor("big", GgmlType::kF32, {int64_t{1} << 40, int64_t{1} << 40}, "");
  ExpectRejected(w.Build(),
                 "tensor \"big\": dimension 1 = 1099511627776 makes the tensor too large");
  GgufWriter n;
  n.Tensor("neg", GgmlType::kF32, {-1}, "");  // u64 above INT64_MAX
  ExpectRejected(n.Build(), "tensor \"neg\": dimension 0 = 18446744073709551615");
  GgufWriter d;
  d.Tensor("five", GgmlType::kF32, {1, 1, 1, 1, 1}, "");
  ExpectRejected(d.Build(), "tensor \"five\": 5 dimensions (at most 4)");
  GgufWriter b;
  b.Tensor("q", GgmlType::kQ4_0, {20, 2}, std::string(36, '\0'));
  ExpectRejected(b.Build(),
                 "tensor \"q\": row length ne[0] = 20 is not a multiple of the Q4_0 block size 32");
}

TEST(GgufRejects, UnknownTypes) {
  GgufWriter w;
  w.Tensor("t", static_cast<GgmlType>(31), {4}, std::string(16, '\0'));
  ExpectRejected(w.Build(), "tensor \"t\": unknown ggml type 31");
  GgufWriter v;
  v.Raw("k", static_cast<GgufType>(13), Le(0, 8));
  ExpectRejected(v.Build(), "metadata key \"k\": unknown value type 13");
  GgufWriter a;
  a.Raw("k", GgufType::kArray, GgufArray(static_cast<GgufType>(99), 0, ""));
  ExpectRejected(a.Build(), "metadata key \"k\": array of unknown element type 99");
  GgufWriter b;
  b.Raw("flag", GgufType::kBool, std::string(1, '\x02'));
  ExpectRejected(b.Build(), "metadata key \"flag\": bool value 2 is neither 0 nor 1");
}

TEST(GgufRejects, DuplicateNames) {
  GgufWriter w;
  w.FloatTensor("t", GgmlType::kF32, {1}, {1}).FloatTensor("t", GgmlType::kF32, {1}, {2});
  ExpectRejected(w.Build(), "duplicate tensor name \"t\"");
  GgufWriter k;
  k.U32("a", 1).U32("a", 2);
  ExpectRejected(k.Build(), "duplicate metadata key \"a\"");
}

TEST(GgufRejects, DeepNestingAndLongNames) {
  std::string v = GgufArray(GgufType::kU8, 0, "");
  for (int d = 0; d < 20; ++d) v = GgufArray(GgufType::kArray, 1, v);
  GgufWriter w;
  w.Raw("deep", GgufType::kArray, v);
  ExpectRejected(w.Build(), "arrays nest deeper than 16 levels");
  GgufWriter n;
  n.FloatTensor(std::string(65, 'x'), GgmlType::kF32, {1}, {1});
  ExpectRejected(n.Build(), "tensor #0 name: string length 65 exceeds the limit of 64");
}

}  // namespace
}  // namespace specontext
