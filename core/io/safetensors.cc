// safetensors parsing and the memory-mapped WeightSource (single file and sharded index).
#include "core/io/safetensors.h"

#include <algorithm>
#include <limits>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/io/weight_files.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: ", msg));
}

// Converts a JSON number to a non-negative integer; floats, negatives and huge values are rejected.
bool AsNonNegativeInt(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t x = v.get<int64_t>();
    if (x < 0) return false;
    *out = static_cast<uint64_t>(x);
    return true;
  }
  return false;
}

absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& name, const json& v, uint64_t data_size) {
  const std::string where = absl::StrCat("tensor \"", name, "\": ");
  if (!v.is_object()) return Bad(where + "entry is not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!v.contains(key)) return Bad(absl::StrCat(where, "missing \"", key, "\""));
  }
  SafetensorsEntry e;
  e.name = name;
  const json& dt = v["dtype"];
  if (!dt.is_string()) return Bad(where + "\"dtype\" is not a string");
  absl::StatusOr<DType> dtype = ParseSafetensorsDType(dt.get<std::string>());
  if (!dtype.ok()) return Bad(absl::StrCat(where, dtype.status().message()));
  e.dtype = *dtype;

  const json& shape = v["shape"];
  if (!shape.is_array()) return Bad(where + "\"shape\" is not an array");
  if (shape.size() > 8) return Bad(absl::StrCat(where, "rank ", shape.size(), " is more than 8"));
  uint64_t numel = 1;
  for (const json& d : shape) {
    uint64_t dim = 0;
    if (!AsNonNegativeInt(d, &dim)) {
      return Bad(absl::StrCat(where, "shape has a negative or non-integer dimension ", d.dump()));
    }
    if (dim > (1ull << 48) || __builtin_mul_overflow(numel, dim, &numel)) {
      return Bad(where + "shape is too large");
    }
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  const json& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !AsNonNegativeInt(off[0], &e.begin) ||
      !AsNonNegativeInt(off[1], &e.end)) {
    return Bad(where + "\"data_offsets\" must be two non-negative integers [begin, end]");
  }
  if (e.begin > e.end) {
    return Bad(absl::StrCat(where, "data_offsets begin ", e.begin, " > end ", e.end));
  }
  if (e.end > data_size) {
    return Bad(absl::StrCat(where, "data_offsets end ", e.end, " is past the data section (", data_size,
                            " bytes)"));
  }
  // Sizes in bits: F4/F6 pack elements below a byte; a tensor must still end on a whole byte (as the
  // reference reader requires).
  uint64_t bits = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(DTypeBits(e.dtype)), &bits)) {
    return Bad(where + "shape is too large");
  }
  if (bits % 8 != 0) {
    return Bad(absl::StrCat(where, numel, " elements of ", std::string(SafetensorsDTypeName(e.dtype)),
                            " do not fill whole bytes"));
  }
  if (bits / 8 != e.end - e.begin) {
    return Bad(absl::StrCat(where, "shape ", ShapeToString(e.shape), " of ",
                            std::string(SafetensorsDTypeName(e.dtype)), " needs ", numel, " x ",
                            DTypeBits(e.dtype), " bits = ", bits / 8, " bytes but data_offsets span ",
                            e.end - e.begin));
  }
  return e;
}

// Tensor views into one buffer. Lookup by name through an index into `entries_`.
class BufferWeights final : public WeightSource {
 public:
  BufferWeights(const uint8_t* data, SafetensorsHeader header, std::shared_ptr<void> storage)
      : data_(data), header_(std::move(header)), storage_(std::move(storage)) {
    for (size_t i = 0; i < header_.tensors.size(); ++i) by_name_.emplace(header_.tensors[i].name, i);
  }
  bool Has(std::string_view name) const override { return by_name_.count(std::string(name)) > 0; }
  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    auto it = by_name_.find(std::string(name));
    if (it == by_name_.end()) {
      return absl::NotFoundError(absl::StrCat("tensor \"", std::string(name), "\" not found"));
    }
    const SafetensorsEntry& e = header_.tensors[it->second];
    // const_cast: Tensor has no const view type; the mapping is PROT_READ, so writes would fault.
    auto* p = const_cast<uint8_t*>(data_ + header_.data_start + e.begin);
    return Tensor(p, e.dtype, e.shape, DeviceKind::kCpu, storage_);
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> names;
    names.reserve(header_.tensors.size());
    for (const SafetensorsEntry& e : header_.tensors) names.push_back(e.name);
    return names;
  }

 private:
  const uint8_t* data_;
  SafetensorsHeader header_;
  std::shared_ptr<void> storage_;
  std::unordered_map<std::string, size_t> by_name_;
};

absl::Status WithPath(const std::string& path, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size) {
  if (size < 8) return Bad(absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian regardless of host
  if (n > kMaxSafetensorsHeaderBytes) {
    return Bad(absl::StrCat("header length ", n, " is absurd (limit ", kMaxSafetensorsHeaderBytes, ")"));
  }
  if (n > size - 8) {
    return Bad(absl::StrCat("header length ", n, " runs past the end of the file (", size, " bytes)"));
  }
  SafetensorsHeader h;
  h.data_start = 8 + n;
  h.data_size = size - h.data_start;
  json root = json::parse(data + 8, data + 8 + n, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return Bad("header is not valid JSON");
  if (!root.is_object()) return Bad("header is not a JSON object");
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return Bad("__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) {
          return Bad(absl::StrCat("__metadata__ value of \"", m.key(), "\" is not a string"));
        }
        h.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    ASSIGN_OR_RETURN(SafetensorsEntry e, ParseEntry(it.key(), it.value(), h.data_size));
    h.tensors.push_back(std::move(e));
  }
  // Overlap check on a copy sorted by offset; empty tensors overlap nothing.
  std::vector<const SafetensorsEntry*> sorted;
  for (const SafetensorsEntry& e : h.tensors) {
    if (e.end > e.begin) sorted.push_back(&e);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i]->begin < sorted[i - 1]->end) {
      return Bad(absl::StrCat("tensors \"", sorted[i - 1]->name, "\" [", sorted[i - 1]->begin, ", ",
                              sorted[i - 1]->end, ") and \"", sorted[i]->name, "\" [", sorted[i]->begin,
                              ", ", sorted[i]->end, ") overlap"));
    }
  }
  return h;
}

absl::StatusOr<std::unique_ptr<WeightSource>> SafetensorsFromBuffer(const uint8_t* data, size_t size,
                                                                   std::shared_ptr<void> storage) {
  ASSIGN_OR_RETURN(SafetensorsHeader h, ParseSafetensorsHeader(data, size));
  return std::unique_ptr<WeightSource>(new BufferWeights(data, std::move(h), std::move(storage)));
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensors(const std::string& path) {
  absl::StatusOr<MappedFile> mf = MapFileReadOnly(path);
  if (!mf.ok()) return mf.status();
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = SafetensorsFromBuffer(mf->data, mf->size, mf->storage);
  if (!ws.ok()) return WithPath(path, ws.status());
  return ws;
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensorsIndex(const std::string& index_path) {
  return OpenShardedIndex(index_path, OpenSafetensors);
}

}  // namespace specontext
