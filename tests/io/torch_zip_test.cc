// torch.save archives: files written by torch itself (tests/data/torch,
// tools/reference/make_draft_fixtures.py), our writer round-tripped, and crafted archives that must
// be refused with a message naming the problem.
#include "core/io/torch_zip.h"

#include <cmath>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/io/pickle.h"
#include "core/io/torch_zip_writer.h"
#include "core/io/weight_files.h"
#include "core/io/zip_archive.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/io/test_util.h"

namespace specontext {
namespace {

using ::specontext::testing::FreshSeed;
using ::specontext::testing::ScratchDir;
using ::testing::HasSubstr;

const std::string kTorchData = std::string(SPECONTEXT_TEST_DATA) + "/torch/";

// The fixture generator's values: element k of NAME is ((37 k + salt) mod 31 - 15) / 16, salt =
// FNV-1a(NAME) mod 997.
float Pattern(const std::string& name, int64_t k) {
  uint32_t h = 0x811c9dc5u;
  for (unsigned char c : name) h = (h ^ c) * 0x01000193u;
  return static_cast<float>((37 * k + h % 997) % 31 - 15) / 16.0f;
}

std::vector<float> F32(const Tensor& t) {
  std::vector<float> v(t.numel());
  ConvertToF32(t.data(), t.dtype(), v.data(), t.numel());
  return v;
}

void ExpectPattern(const WeightSource& ws, const std::string& name, DType dtype,
                   const Shape& shape) {
  absl::StatusOr<Tensor> t = ws.Get(name);
  ASSERT_TRUE(t.ok()) << name << ": " << t.status();
  EXPECT_EQ(t->dtype(), dtype) << name;
  EXPECT_EQ(t->shape(), shape) << name;
  const std::vector<float> v = F32(*t);
  for (size_t k = 0; k < v.size(); ++k)
    ASSERT_EQ(v[k], Pattern(name, k)) << name << "[" << k << "]";
}

TEST(TorchZip, ReadsAStateDictWrittenByTorchSave) {
  absl::StatusOr<std::unique_ptr<WeightSource>> ws =
      OpenTorchCheckpoint(kTorchData + "state_dict.bin");
  ASSERT_TRUE(ws.ok()) << ws.status();
  const WeightSource& w = **ws;
  EXPECT_THAT(w.Names(),
              ::testing::ElementsAre("weight", "bias", "f32", "f16", "bf16", "mask", "ids",
                                     "scalar", "param", "base", "row1", "col", "t"));
  ExpectPattern(w, "f32", DType::kF32, {3, 5});
  ExpectPattern(w, "f16", DType::kF16, {4, 3});
  ExpectPattern(w, "bf16", DType::kBF16, {2, 2, 3});
  ExpectPattern(w, "param", DType::kF32,
                {2, 3});  // an nn.Parameter: torch._utils._rebuild_parameter
  // A module's state dict (its OrderedDict carries _metadata, set by BUILD).
  {
    Tensor weight = *w.Get("weight"), bias = *w.Get("bias");
    EXPECT_EQ(weight.shape(), Shape({3, 4}));
    for (int k = 0; k < 12; ++k) EXPECT_EQ(F32(weight)[k], Pattern("linear.weight", k));
    for (int k = 0; k < 3; ++k) EXPECT_EQ(F32(bias)[k], Pattern("linear.bias", k));
  }
  Tensor mask = *w.Get("mask");
  EXPECT_EQ(mask.dtype(), DType::kBool);
  for (int k = 0; k < 7; ++k)
    EXPECT_EQ(static_cast<const uint8_t*>(mask.data())[k], k % 3 == 0 ? 1 : 0);
  Tensor ids = *w.Get("ids");
  EXPECT_EQ(ids.dtype(), DType::kI64);
  EXPECT_THAT(std::vector<int64_t>(ids.as<int64_t>(), ids.as<int64_t>() + 4),
              ::testing::ElementsAre(-2, 0, 5, int64_t{1} << 40));
  Tensor scalar = *w.Get("scalar");
  EXPECT_EQ(scalar.shape(), Shape());
  EXPECT_EQ(*scalar.as<float>(), 2.5f);
  // Four views of one storage (arange(24)): the contiguous ones alias it, the strided ones are
  // copied.
  Tensor base = *w.Get("base"), row1 = *w.Get("row1"), col = *w.Get("col"), t = *w.Get("t");
  EXPECT_EQ(base.shape(), Shape({4, 6}));
  for (int k = 0; k < 24; ++k) EXPECT_EQ(base.as<float>()[k], k);
  EXPECT_EQ(row1.as<float>(), base.as<float>() + 6)
      << "a contiguous view shares its storage, at its offset";
  for (int k = 0; k < 6; ++k) EXPECT_EQ(row1.as<float>()[k], 6 + k);
  EXPECT_THAT(F32(col), ::testing::ElementsAre(1, 7, 13, 19));
  ASSERT_EQ(t.shape(), Shape({6, 4}));
  for (int i = 0; i < 6; ++i) {
    for (int j = 0; j < 4; ++j) EXPECT_EQ(t.as<float>()[i * 4 + j], j * 6 + i) << i << "," << j;
  }
}

TEST(TorchZip, RefusesWhatItCannotReadSafely) {
  auto err = [](const std::string& file) {
    return std::string(OpenTorchCheckpoint(kTorchData + file).status().message());
  };
  EXPECT_THAT(err("legacy.bin"), HasSubstr("legacy torch.save format"));
  const std::string evil = err("forbidden_global.bin");
  EXPECT_THAT(evil, HasSubstr("global os.system is not allowed"));
  EXPECT_THAT(err("compressed.bin"),
              HasSubstr("entry \"compressed/data.pkl\": is compressed (method 8)"));
  EXPECT_THAT(err("missing.bin"), HasSubstr("missing.bin"));
}

// --- crafted archives
// -------------------------------------------------------------------------------------

void Le(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// A stored ZIP of `entries` (name, bytes), minimal headers, no alignment. `zip64`: sizes and
// offsets in ZIP64 extra fields and a ZIP64 end record, as writers do past 4 GiB.
std::string ZipOf(const std::vector<std::pair<std::string, std::string>>& entries,
                  bool zip64 = false) {
  std::string out, cd;
  for (const auto& [name, bytes] : entries) {
    const uint64_t at = out.size();
    Le(&out, 0x04034b50, 4);
    Le(&out, 20, 2);
    Le(&out, 0, 2 + 2 + 4);
    Le(&out, Crc32(0, bytes.data(), bytes.size()), 4);
    Le(&out, bytes.size(), 4);
    Le(&out, bytes.size(), 4);
    Le(&out, name.size(), 2);
    Le(&out, 0, 2);
    out += name + bytes;
    Le(&cd, 0x02014b50, 4);
    Le(&cd, 20, 2);
    Le(&cd, 20, 2);
    Le(&cd, 0, 2 + 2 + 4);
    Le(&cd, Crc32(0, bytes.data(), bytes.size()), 4);
    Le(&cd, zip64 ? 0xffffffffu : bytes.size(), 4);
    Le(&cd, zip64 ? 0xffffffffu : bytes.size(), 4);
    Le(&cd, name.size(), 2);
    Le(&cd, zip64 ? 28 : 0, 2);  // extra
    Le(&cd, 0, 2 + 2 + 2 + 4);
    Le(&cd, zip64 ? 0xffffffffu : at, 4);
    cd += name;
    if (zip64) {  // id 1: uncompressed size, compressed size, local header offset
      Le(&cd, 1, 2);
      Le(&cd, 24, 2);
      Le(&cd, bytes.size(), 8);
      Le(&cd, bytes.size(), 8);
      Le(&cd, at, 8);
    }
  }
  const uint64_t cd_at = out.size();
  out += cd;
  if (zip64) {
    const uint64_t rec = out.size();
    Le(&out, 0x06064b50, 4);
    Le(&out, 44, 8);
    Le(&out, 45, 2);
    Le(&out, 45, 2);
    Le(&out, 0, 4 + 4);
    Le(&out, entries.size(), 8);
    Le(&out, entries.size(), 8);
    Le(&out, cd.size(), 8);
    Le(&out, cd_at, 8);
    Le(&out, 0x07064b50, 4);
    Le(&out, 0, 4);
    Le(&out, rec, 8);
    Le(&out, 1, 4);
  }
  Le(&out, 0x06054b50, 4);
  Le(&out, 0, 4);
  Le(&out, zip64 ? 0xffff : entries.size(), 2);
  Le(&out, zip64 ? 0xffff : entries.size(), 2);
  Le(&out, zip64 ? 0xffffffffu : cd.size(), 4);
  Le(&out, zip64 ? 0xffffffffu : cd_at, 4);
  Le(&out, 0, 2);
  return out;
}

// data.pkl of {"w": _rebuild_tensor_v2((storage, type, "0", "cpu", numel), offset, size, stride,
// False, {})}.
std::string OneTensorPickle(const std::string& storage_type, int numel, int offset,
                            const std::vector<int>& size, const std::vector<int>& stride) {
  std::string p = "\x80\x02}X";
  Le(&p, 1, 4);
  p += "wctorch._utils\n_rebuild_tensor_v2\n((X";
  Le(&p, 7, 4);
  p += "storagectorch\n" + storage_type + "\nX";
  Le(&p, 1, 4);
  p += "0X";
  Le(&p, 3, 4);
  p += "cpuJ";
  Le(&p, static_cast<uint32_t>(numel), 4);
  p += "tQJ";
  Le(&p, static_cast<uint32_t>(offset), 4);
  for (const std::vector<int>* tuple : {&size, &stride}) {
    p += "(";
    for (int v : *tuple) {
      p += "J";
      Le(&p, static_cast<uint32_t>(v), 4);
    }
    p += "t";
  }
  p += "\x89}tRs.";
  return p;
}

absl::Status Open(const std::string& zip) {
  return TorchZipFromBuffer(reinterpret_cast<const uint8_t*>(zip.data()), zip.size(), nullptr)
      .status();
}

TEST(TorchZip, CraftedArchivesAreRefusedWithTheirReason) {
  const std::string f32x4(16, '\0');
  struct Case {
    const char* label;
    std::string zip;
    const char* expect;
  };
  const Case cases[] = {
      {"view past its storage",
       ZipOf(
           {{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 1, {4}, {1})}, {"a/data/0", f32x4}}),
       "reaches element 4 of storage \"0\""},
      {"storage size differs",
       ZipOf({{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {4}, {1})}, {"a/data/0", "xx"}}),
       "holds 2 bytes but the pickle says 16"},
      {"storage missing", ZipOf({{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {4}, {1})}}),
       "its storage a/data/0 is not in the archive"},
      {"expanded view",
       ZipOf({{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {4, 8}, {1, 0})},
              {"a/data/0", f32x4}}),
       "overlapping view"},
      {"unknown storage type",
       ZipOf(
           {{"a/data.pkl", OneTensorPickle("QInt8Storage", 4, 0, {4}, {1})}, {"a/data/0", f32x4}}),
       "global torch.QInt8Storage is not allowed"},
      {"big endian",
       ZipOf({{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {4}, {1})},
              {"a/byteorder", "big"},
              {"a/data/0", f32x4}}),
       "byteorder is \"big\""},
      {"torchscript", ZipOf({{"m/constants.pkl", "\x80\x02)."}, {"m/code/x.py", ""}}),
       "TorchScript archive"},
      {"two pickles", ZipOf({{"a/data.pkl", "."}, {"b/data.pkl", "."}}), "more than one data.pkl"},
      {"not a dict", ZipOf({{"a/data.pkl", "\x80\x02]."}}), "not a dict"},
      {"opcode INST", ZipOf({{"a/data.pkl", "\x80\x02(ios\nsystem\n."}}), "opcode 0x69"},
      {"NEWOBJ", ZipOf({{"a/data.pkl", "\x80\x02\x81."}}), "opcode 0x81"},
      {"no STOP", ZipOf({{"a/data.pkl", "\x80\x02}"}}), "without a STOP"},
      {"truncated string",
       ZipOf({{"a/data.pkl", std::string("\x80\x02X\xff\x00\x00\x00", 7) + "ab"}}),
       "runs past the end"},
      {"memo miss", ZipOf({{"a/data.pkl", "\x80\x02h\x05."}}), "memo entry 5 was never stored"},
      {"not a zip", "hello world, not an archive at all", "not a ZIP archive"},
  };
  for (const Case& c : cases) {
    absl::Status s = Open(c.zip);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.label;
    EXPECT_THAT(s.message(), HasSubstr(c.expect)) << c.label;
  }
  // The same archive with ZIP64 sizes and offsets; its ZIP64 fields missing.
  const std::string zip64 = ZipOf(
      {{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {2, 2}, {2, 1})}, {"a/data/0", f32x4}},
      true);
  EXPECT_TRUE(Open(zip64).ok()) << Open(zip64);
  std::string no_locator = zip64;
  no_locator.replace(no_locator.rfind(std::string("PK\x06\x07", 4)), 4, "XXXX");
  EXPECT_THAT(Open(no_locator).message(), HasSubstr("no ZIP64 locator"));
  // Truncations of a valid archive never crash and never succeed past the central directory.
  const std::string good = ZipOf(
      {{"a/data.pkl", OneTensorPickle("FloatStorage", 4, 0, {2, 2}, {2, 1})}, {"a/data/0", f32x4}});
  ASSERT_TRUE(Open(good).ok()) << Open(good);
  for (size_t n = 0; n < good.size(); ++n) EXPECT_FALSE(Open(good.substr(0, n)).ok()) << n;
}

// --- our writer
// -------------------------------------------------------------------------------------------

uint32_t BitwiseCrc(const std::string& s) {
  uint32_t c = 0xffffffffu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
  }
  return ~c;
}

TEST(TorchZip, Crc32CombineEqualsTheCrcOfTheConcatenation) {
  std::mt19937 rng(FreshSeed());
  for (int round = 0; round < 50; ++round) {
    std::string a(rng() % 300, '\0'), b(rng() % 5000, '\0');
    for (char& c : a) c = static_cast<char>(rng());
    for (char& c : b) c = static_cast<char>(rng());
    const uint32_t ca = Crc32(0, a.data(), a.size()), cb = Crc32(0, b.data(), b.size());
    ASSERT_EQ(ca, BitwiseCrc(a));
    ASSERT_EQ(Crc32Combine(ca, cb, b.size()), BitwiseCrc(a + b)) << a.size() << " + " << b.size();
  }
}

TEST(TorchZip, WriterRoundTripsEveryStorageDtypeAlignedWithValidCrcs) {
  ScratchDir dir;
  std::mt19937 rng(FreshSeed());
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64, DType::kI64, DType::kI32,
                  DType::kI16, DType::kI8, DType::kU8, DType::kBool, DType::kC64}) {
    Tensor t = Tensor::HostEmpty(d, {3, 17});
    for (size_t i = 0; i < t.nbytes(); ++i)
      static_cast<uint8_t*>(t.data())[i] = static_cast<uint8_t>(rng());
    tensors.emplace_back(absl::StrCat("layer.", std::string(DTypeName(d))), t);
  }
  tensors.emplace_back("scalar", Tensor::HostEmpty(DType::kF32, {}));
  tensors.emplace_back("empty", Tensor::HostEmpty(DType::kF16, {0, 4}));
  const std::string path = dir.Path("pytorch_model.bin");
  ASSERT_TRUE(WriteTorchCheckpoint(path, tensors).ok());
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = OpenTorchCheckpoint(path);
  ASSERT_TRUE(ws.ok()) << ws.status();
  ASSERT_EQ((*ws)->Names().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    absl::StatusOr<Tensor> got = (*ws)->Get(name);
    ASSERT_TRUE(got.ok()) << name;
    EXPECT_EQ(got->dtype(), t.dtype());
    EXPECT_EQ(got->shape(), t.shape());
    EXPECT_EQ(std::memcmp(got->data(), t.data(), t.nbytes()), 0) << name;
  }
  // What torch checks: stored entries, 64-byte aligned records, CRC-32 of every entry.
  const std::string bytes = testing::ReadFile(path);
  absl::StatusOr<ZipDirectory> zd =
      ParseZipDirectory(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  ASSERT_TRUE(zd.ok()) << zd.status();
  ASSERT_NE(zd->Find("pytorch_model/data.pkl"), nullptr);
  ASSERT_NE(zd->Find("pytorch_model/byteorder"), nullptr);
  for (const ZipEntry& e : zd->entries) EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
  // CRCs: the central directory's field at +16 of each record.
  size_t p = 0;
  int checked = 0;
  while ((p = bytes.find(std::string("PK\x01\x02", 4), p)) != std::string::npos) {
    uint32_t crc = 0, local = 0;
    std::memcpy(&crc, bytes.data() + p + 16, 4);
    std::memcpy(&local, bytes.data() + p + 42, 4);
    uint16_t name_len = 0;
    std::memcpy(&name_len, bytes.data() + p + 28, 2);
    const ZipEntry* e = zd->Find(bytes.substr(p + 46, name_len));
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(crc, BitwiseCrc(bytes.substr(e->data_offset, e->size))) << e->name;
    ++checked;
    p += 46;
  }
  EXPECT_EQ(checked, static_cast<int>(zd->entries.size()));
}

TEST(TorchZip, WeightFilesFindsEveryLayoutAndSaysWhatItLookedFor) {
  ScratchDir dir;
  absl::StatusOr<WeightFiles> none = OpenWeightFiles(dir.Path(""));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(),
              HasSubstr("model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                        "pytorch_model.bin.index.json"));
  // Two torch shards behind a pytorch_model.bin.index.json.
  Tensor a = Tensor::HostEmpty(DType::kF32, {2}), b = Tensor::HostEmpty(DType::kBF16, {3});
  a.as<float>()[1] = 7.0f;
  ASSERT_TRUE(WriteTorchCheckpoint(dir.Path("pytorch_model-00001-of-00002.bin"), {{"a", a}}).ok());
  ASSERT_TRUE(WriteTorchCheckpoint(dir.Path("pytorch_model-00002-of-00002.bin"), {{"b", b}}).ok());
  testing::WriteFile(dir.Path("pytorch_model.bin.index.json"),
                     R"({"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                         "b": "pytorch_model-00002-of-00002.bin"}})");
  absl::StatusOr<WeightFiles> sharded = OpenWeightFiles(dir.Path(""));
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ(sharded->file, "pytorch_model.bin.index.json");
  EXPECT_EQ(sharded->weights->Get("a")->as<float>()[1], 7.0f);
  EXPECT_EQ(sharded->weights->Get("b")->dtype(), DType::kBF16);
  // A single pytorch_model.bin comes before the shards' index.
  ASSERT_TRUE(WriteTorchCheckpoint(dir.Path("pytorch_model.bin"), {{"c", a}}).ok());
  EXPECT_EQ(OpenWeightFiles(dir.Path(""))->file, "pytorch_model.bin");
}

}  // namespace
}  // namespace specontext
