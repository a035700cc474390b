// GGUF parsing. Format facts: ggml docs/gguf.md and the gguf Python package (gguf_reader.py,
// constants.py); no code is taken from either.
#include "core/io/gguf.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("gguf: ", msg));
}

uint64_t LoadLE(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  for (size_t k = n; k-- > 0;) v = (v << 8) | p[k];  // little-endian regardless of host
  return v;
}

// A bounds-checked little-endian cursor over the buffer.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  bool Uint(size_t n, uint64_t* out) {
    if (n > left()) return false;
    *out = LoadLE(data_ + pos_, n);
    pos_ += n;
    return true;
  }
  bool U32(uint32_t* out) {
    uint64_t v;
    if (!Uint(4, &v)) return false;
    *out = static_cast<uint32_t>(v);
    return true;
  }
  bool U64(uint64_t* out) { return Uint(8, out); }
  // A view of the next n bytes.
  bool Bytes(uint64_t n, std::string_view* out) {
    if (n > left()) return false;
    *out = std::string_view(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return true;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kF64); }

// Smallest number of bytes one element of `type` takes in the file.
size_t MinValueBytes(GgufType type) {
  if (type == GgufType::kString) return 8;     // the length
  if (type == GgufType::kArray) return 4 + 8;  // element type + count
  return GgufScalarSize(type);
}

// A string: u64 length, then the bytes. `what` names it for the message.
absl::Status ReadString(Cursor& c, const std::string& what, std::string_view* out,
                        uint64_t max_len) {
  uint64_t n = 0;
  if (!c.U64(&n)) return Bad(absl::StrCat(what, ": truncated string length"));
  if (n > max_len)
    return Bad(absl::StrCat(what, ": string length ", n, " exceeds the limit of ", max_len));
  if (!c.Bytes(n, out)) {
    return Bad(absl::StrCat(what, ": string length ", n, " runs past the end of the file (",
                            c.left(), " bytes left)"));
  }
  return absl::OkStatus();
}

// Fills v's scalar fields from the little-endian `bits` of a value of fixed-size `type`.
void DecodeScalar(GgufType type, uint64_t bits, GgufValue* v) {
  v->type = type;
  switch (type) {
    case GgufType::kU8:
    case GgufType::kU16:
    case GgufType::kU32:
    case GgufType::kU64:
      v->u = bits;
      break;
    case GgufType::kI8:
      v->i = static_cast<int8_t>(bits);
      break;
    case GgufType::kI16:
      v->i = static_cast<int16_t>(bits);
      break;
    case GgufType::kI32:
      v->i = static_cast<int32_t>(bits);
      break;
    case GgufType::kI64:
      v->i = static_cast<int64_t>(bits);
      break;
    case GgufType::kBool:
      v->i = bits != 0;
      break;
    case GgufType::kF32: {
      const uint32_t b = static_cast<uint32_t>(bits);
      float f;
      std::memcpy(&f, &b, 4);
      v->f = f;
      break;
    }
    case GgufType::kF64:
      std::memcpy(&v->f, &bits, 8);
      break;
    default:
      break;
  }
}

absl::Status ReadScalar(Cursor& c, GgufType type, const std::string& what, GgufValue* v) {
  uint64_t bits = 0;
  if (!c.Uint(GgufScalarSize(type), &bits)) {
    return Bad(absl::StrCat(what, ": truncated ", GgufTypeName(type), " value"));
  }
  if (type == GgufType::kBool && bits > 1)
    return Bad(absl::StrCat(what, ": bool value ", bits, " is neither 0 nor 1"));
  DecodeScalar(type, bits, v);
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor& c, uint32_t raw_type, size_t depth, const std::string& what,
                       GgufValue* v) {
  if (!KnownValueType(raw_type)) return Bad(absl::StrCat(what, ": unknown value type ", raw_type));
  const GgufType type = static_cast<GgufType>(raw_type);
  if (type == GgufType::kString) {
    v->type = type;
    return ReadString(c, what, &v->str, std::numeric_limits<uint64_t>::max());
  }
  if (type != GgufType::kArray) return ReadScalar(c, type, what, v);

  v->type = type;
  if (depth >= kGgufMaxArrayDepth) {
    return Bad(absl::StrCat(what, ": arrays nest deeper than ", kGgufMaxArrayDepth, " levels"));
  }
  uint32_t elem = 0;
  if (!c.U32(&elem) || !c.U64(&v->count))
    return Bad(absl::StrCat(what, ": truncated array header"));
  if (!KnownValueType(elem))
    return Bad(absl::StrCat(what, ": array of unknown element type ", elem));
  v->elem_type = static_cast<GgufType>(elem);
  // Check the count against the bytes left before reserving anything for it.
  const size_t min_bytes = MinValueBytes(v->elem_type);
  if (v->count > c.left() / min_bytes) {
    return Bad(absl::StrCat(what, ": array of ", v->count, " ", GgufTypeName(v->elem_type),
                            " elements needs at least ", min_bytes, " bytes each but only ",
                            c.left(), " bytes are left"));
  }
  if (v->elem_type == GgufType::kString) {
    v->strings.resize(v->count);
    for (uint64_t k = 0; k < v->count; ++k) {
      RETURN_IF_ERROR(ReadString(c, absl::StrCat(what, "[", k, "]"), &v->strings[k],
                                 std::numeric_limits<uint64_t>::max()));
    }
  } else if (v->elem_type == GgufType::kArray) {
    v->items.resize(v->count);
    for (uint64_t k = 0; k < v->count; ++k) {
      // A nested array is its element type and count, then its elements (no value type of its own).
      RETURN_IF_ERROR(ReadValue(c, static_cast<uint32_t>(GgufType::kArray), depth + 1,
                                absl::StrCat(what, "[", k, "]"), &v->items[k]));
    }
  } else {
    if (!c.Bytes(v->count * min_bytes, &v->raw))
      return Bad(absl::StrCat(what, ": truncated array"));
    if (v->elem_type == GgufType::kBool) {
      for (char b : v->raw) {
        if (static_cast<uint8_t>(b) > 1)
          return Bad(absl::StrCat(what, ": bool element is neither 0 nor 1"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ReadTensorInfo(Cursor& c, size_t index, GgufTensorInfo* t) {
  std::string_view name;
  RETURN_IF_ERROR(
      ReadString(c, absl::StrCat("tensor #", index, " name"), &name, kGgufMaxTensorNameBytes));
  t->name = std::string(name);
  const std::string where = absl::StrCat("tensor \"", t->name, "\"");
  if (!c.U32(&t->n_dims)) return Bad(absl::StrCat(where, ": truncated dimension count"));
  if (t->n_dims > 4) return Bad(absl::StrCat(where, ": ", t->n_dims, " dimensions (at most 4)"));
  int64_t numel = 1;
  for (uint32_t d = 0; d < t->n_dims; ++d) {
    uint64_t ne = 0;
    if (!c.U64(&ne)) return Bad(absl::StrCat(where, ": truncated dimensions"));
    if (ne > static_cast<uint64_t>(kMaxGgmlElements) ||
        __builtin_mul_overflow(numel, static_cast<int64_t>(ne), &numel) ||
        numel > kMaxGgmlElements) {
      return Bad(absl::StrCat(where, ": dimension ", d, " = ", ne,
                              " makes the tensor too large (limit ", kMaxGgmlElements,
                              " elements)"));
    }
    t->ne[d] = static_cast<int64_t>(ne);
  }
  uint32_t type = 0;
  if (!c.U32(&type) || !c.U64(&t->offset))
    return Bad(absl::StrCat(where, ": truncated type or offset"));
  const std::optional<GgmlTypeTraits> traits = GgmlTypeTraitsOf(type);
  if (!traits) return Bad(absl::StrCat(where, ": unknown ggml type ", type));
  t->type = static_cast<GgmlType>(type);
  if (t->ne[0] % traits->block_size != 0) {
    return Bad(absl::StrCat(where, ": row length ne[0] = ", t->ne[0], " is not a multiple of the ",
                            traits->name, " block size ", traits->block_size));
  }
  t->nbytes =
      static_cast<uint64_t>(numel) / traits->block_size * traits->type_size;  // < 2^50 * 2^9
  return absl::OkStatus();
}

// general.alignment: a u32, non-zero power of two.
absl::StatusOr<uint32_t> Alignment(const GgufFile& f) {
  const GgufValue* v = f.Find("general.alignment");
  if (v == nullptr) return kGgufDefaultAlignment;
  if (v->type != GgufType::kU32) {
    return Bad(absl::StrCat("general.alignment must be a u32, not ", GgufTypeName(v->type)));
  }
  if (v->u == 0 || (v->u & (v->u - 1)) != 0) {
    return Bad(absl::StrCat("general.alignment ", v->u, " is not a power of two"));
  }
  return static_cast<uint32_t>(v->u);
}

// Tensor data: aligned offsets, ranges inside the data section, no two tensors overlapping.
absl::Status CheckTensorRanges(const GgufFile& f) {
  const uint64_t data_size = f.size > f.data_start ? f.size - f.data_start : 0;
  std::vector<const GgufTensorInfo*> sorted;
  for (const GgufTensorInfo& t : f.tensors) {
    const std::string where = absl::StrCat("tensor \"", t.name, "\"");
    if (t.offset % f.alignment != 0) {
      return Bad(absl::StrCat(where, ": offset ", t.offset, " is not a multiple of the alignment ",
                              f.alignment));
    }
    if (t.offset > data_size || t.nbytes > data_size - t.offset) {
      return Bad(absl::StrCat(where, ": data [", t.offset, ", ", t.offset, " + ", t.nbytes,
                              ") lies outside the data section (", data_size, " bytes)"));
    }
    if (t.nbytes > 0) sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < sorted.size(); ++k) {
    if (sorted[k]->offset < sorted[k - 1]->offset + sorted[k - 1]->nbytes) {
      return Bad(absl::StrCat("tensors \"", sorted[k - 1]->name, "\" and \"", sorted[k]->name,
                              "\" overlap"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string GgufTypeName(GgufType type) {
  static constexpr const char* kNames[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                           "bool", "string", "array", "u64", "i64", "f64"};
  const uint32_t id = static_cast<uint32_t>(type);
  return id < std::size(kNames) ? kNames[id] : absl::StrCat("type ", id);
}

size_t GgufScalarSize(GgufType type) {
  switch (type) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kBool:
      return 1;
    case GgufType::kU16:
    case GgufType::kI16:
      return 2;
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kF32:
      return 4;
    case GgufType::kU64:
    case GgufType::kI64:
    case GgufType::kF64:
      return 8;
    default:
      return 0;
  }
}

bool GgufIsInteger(GgufType type) {
  switch (type) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kU16:
    case GgufType::kI16:
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kU64:
    case GgufType::kI64:
      return true;
    default:
      return false;
  }
}

std::optional<int64_t> GgufValue::AsInt() const {
  if (!is_integer()) return std::nullopt;
  switch (type) {
    case GgufType::kU8:
    case GgufType::kU16:
    case GgufType::kU32:
    case GgufType::kU64:
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return static_cast<int64_t>(u);
    default:
      return i;
  }
}

std::optional<double> GgufValue::AsDouble() const {
  if (is_float()) return f;
  if (type == GgufType::kU8 || type == GgufType::kU16 || type == GgufType::kU32 ||
      type == GgufType::kU64) {
    return static_cast<double>(u);
  }
  if (is_integer()) return static_cast<double>(i);
  return std::nullopt;
}

GgufValue GgufValue::Element(uint64_t k) const {
  GgufValue e;
  e.type = elem_type;
  const size_t n = GgufScalarSize(elem_type);
  if (type != GgufType::kArray || n == 0 || k >= count || raw.size() / n <= k) return e;
  DecodeScalar(elem_type, LoadLE(reinterpret_cast<const uint8_t*>(raw.data()) + k * n, n), &e);
  return e;
}

uint64_t GgufTensorInfo::row_bytes() const {
  const std::optional<GgmlTypeTraits> t = GgmlTypeTraitsOf(type);
  return t ? static_cast<uint64_t>(ne[0]) / t->block_size * t->type_size : 0;
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = key_index.find(std::string(key));
  return it == key_index.end() ? nullptr : &metadata[it->second].value;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index.find(std::string(name));
  return it == tensor_index.end() ? nullptr : &tensors[it->second];
}

bool HasGgufMagic(const uint8_t* data, size_t size) {
  return size >= 4 && std::memcmp(data, "GGUF", 4) == 0;
}

bool FileHasGgufMagic(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  if (!in.read(magic, 4)) return false;
  return HasGgufMagic(reinterpret_cast<const uint8_t*>(magic), 4);
}

absl::StatusOr<GgufFile> ParseGguf(const uint8_t* data, size_t size,
                                   std::shared_ptr<void> storage) {
  if (!HasGgufMagic(data, size)) return Bad("not a GGUF file (the first 4 bytes are not \"GGUF\")");
  Cursor c(data, size);
  uint64_t skip;
  c.Uint(4, &skip);
  GgufFile f;
  f.data = data;
  f.size = size;
  f.storage = std::move(storage);
  if (!c.U32(&f.version)) return Bad("truncated header (no version)");
  if ((f.version & 0xffffu) == 0 && f.version != 0) {
    // A version whose low 16 bits are zero is a small number written big-endian (gguf_reader.py).
    return absl::UnimplementedError(
        "gguf: big-endian GGUF files are not supported (convert with --bigendian off)");
  }
  if (f.version == 1) {
    return absl::UnimplementedError(
        "gguf: GGUF version 1 is not supported (re-convert with a current llama.cpp)");
  }
  if (f.version != 2 && f.version != 3) {
    return absl::UnimplementedError(
        absl::StrCat("gguf: unsupported GGUF version ", f.version, " (supported: 2, 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  if (!c.U64(&n_tensors) || !c.U64(&n_kv))
    return Bad("truncated header (tensor and key/value counts)");
  // Smallest key/value: empty key (8) + type (4) + 1-byte value; smallest tensor info: empty name
  // (8)
  // + n_dims (4) + type (4) + offset (8).
  if (n_kv > c.left() / 13) {
    return Bad(
        absl::StrCat("header claims ", n_kv, " key/values but only ", c.left(), " bytes follow"));
  }
  f.metadata.reserve(n_kv);
  for (uint64_t k = 0; k < n_kv; ++k) {
    GgufKeyValue kv;
    std::string_view key;
    RETURN_IF_ERROR(ReadString(c, absl::StrCat("key/value #", k, " key"), &key, kGgufMaxKeyBytes));
    kv.key = std::string(key);
    const std::string what = absl::StrCat("metadata key \"", kv.key, "\"");
    uint32_t type = 0;
    if (!c.U32(&type)) return Bad(absl::StrCat(what, ": truncated value type"));
    RETURN_IF_ERROR(ReadValue(c, type, 0, what, &kv.value));
    if (!f.key_index.emplace(kv.key, f.metadata.size()).second)
      return Bad(absl::StrCat("duplicate ", what));
    f.metadata.push_back(std::move(kv));
  }
  if (n_tensors > c.left() / 24) {
    return Bad(
        absl::StrCat("header claims ", n_tensors, " tensors but only ", c.left(), " bytes follow"));
  }
  f.tensors.resize(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    RETURN_IF_ERROR(ReadTensorInfo(c, k, &f.tensors[k]));
    if (!f.tensor_index.emplace(f.tensors[k].name, k).second) {
      return Bad(absl::StrCat("duplicate tensor name \"", f.tensors[k].name, "\""));
    }
  }
  ASSIGN_OR_RETURN(f.alignment, Alignment(f));
  // The data section starts at the next multiple of the alignment (it may be absent when empty).
  f.data_start = (static_cast<uint64_t>(c.pos()) + f.alignment - 1) / f.alignment * f.alignment;
  RETURN_IF_ERROR(CheckTensorRanges(f));
  return f;
}

absl::StatusOr<GgufFile> OpenGguf(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mf, MapFileReadOnly(path));
  absl::StatusOr<GgufFile> f = ParseGguf(mf.data, mf.size, mf.storage);
  if (!f.ok())
    return absl::Status(f.status().code(), absl::StrCat(path, ": ", f.status().message()));
  return f;
}

}  // namespace specontext
