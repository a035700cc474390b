// torch.save archives as a WeightSource (torch_zip.h).
#include "core/io/torch_zip.h"

#include <cstring>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/io/file_util.h"
#include "core/io/pickle.h"
#include "core/io/zip_archive.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status Bad(const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat("torch checkpoint: ", msg));
}

// A tensor of the archive: its record and where its storage's bytes start in the buffer.
struct Entry {
  TorchTensorRecord record;
  const uint8_t* storage_bytes = nullptr;
};

bool IsContiguous(const TorchTensorRecord& t) {
  int64_t expect = 1;
  for (size_t i = t.shape.size(); i-- > 0;) {
    if (t.shape[i] != 1 && t.stride[i] != expect)
      return false;  // a size-1 dimension may have any stride
    expect *= t.shape[i];
  }
  return true;
}

// Copies a strided view into contiguous memory, element by element in row-major order.
Tensor CopyStrided(const Entry& e) {
  const TorchTensorRecord& t = e.record;
  Tensor out = Tensor::HostEmpty(t.dtype, t.shape);
  const size_t es = DTypeSize(t.dtype);
  const int64_t n = out.numel();
  std::vector<int64_t> index(t.shape.size(), 0);
  auto* dst = static_cast<uint8_t*>(out.data());
  for (int64_t k = 0; k < n; ++k) {
    int64_t src = static_cast<int64_t>(t.offset);
    for (size_t d = 0; d < index.size(); ++d) src += index[d] * t.stride[d];
    std::memcpy(dst + k * es, e.storage_bytes + src * es, es);
    for (size_t d = index.size(); d-- > 0;) {  // odometer increment
      if (++index[d] < t.shape[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

class TorchWeights final : public WeightSource {
 public:
  TorchWeights(std::vector<Entry> entries, std::shared_ptr<void> storage)
      : entries_(std::move(entries)), storage_(std::move(storage)) {
    for (size_t i = 0; i < entries_.size(); ++i) by_name_.emplace(entries_[i].record.name, i);
  }
  bool Has(std::string_view name) const override { return by_name_.count(std::string(name)) > 0; }
  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    auto it = by_name_.find(std::string(name));
    if (it == by_name_.end())
      return absl::NotFoundError(absl::StrCat("tensor \"", std::string(name), "\" not found"));
    const Entry& e = entries_[it->second];
    const TorchTensorRecord& t = e.record;
    if (!IsContiguous(t)) return CopyStrided(e);
    // const_cast: Tensor has no const view type; the mapping is PROT_READ, so writes would fault.
    auto* p = const_cast<uint8_t*>(e.storage_bytes + t.offset * DTypeSize(t.dtype));
    return Tensor(p, t.dtype, t.shape, DeviceKind::kCpu, storage_);
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> names;
    names.reserve(entries_.size());
    for (const Entry& e : entries_) names.push_back(e.record.name);
    return names;
  }

 private:
  std::vector<Entry> entries_;
  std::shared_ptr<void> storage_;
  std::unordered_map<std::string, size_t> by_name_;
};

// The folder holding data.pkl: "archive/" (torch >= 2.x) or the file stem (older torch).
absl::StatusOr<std::string> FindPrefix(const ZipDirectory& dir) {
  std::string prefix;
  int found = 0;
  for (const ZipEntry& e : dir.entries) {
    const size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      prefix = e.name.substr(0, slash + 1);
      ++found;
    }
  }
  if (found == 0) {
    const bool torchscript = [&] {
      for (const ZipEntry& e : dir.entries) {
        if (e.name.find("/constants.pkl") != std::string::npos) return true;
      }
      return false;
    }();
    return Bad(torchscript ? "this is a TorchScript archive (constants.pkl, no data.pkl), not a "
                             "torch.save state dict"
                           : "no <folder>/data.pkl in the archive: not a torch.save checkpoint");
  }
  if (found > 1) return Bad("more than one data.pkl in the archive");
  return prefix;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSource>> TorchZipFromBuffer(const uint8_t* data, size_t size,
                                                                 std::shared_ptr<void> storage) {
  if (!LooksLikeZip(data, size)) {
    if (size >= 2 && data[0] == 0x80 && data[1] <= 5) {
      return Bad(
          "legacy torch.save format (torch < 1.6 or _use_new_zipfile_serialization=False): load it "
          "with "
          "torch and save it again with torch >= 1.6, or convert it to safetensors");
    }
    return Bad("not a ZIP archive (torch.save checkpoints are zip files)");
  }
  absl::StatusOr<ZipDirectory> dir = ParseZipDirectory(data, size);
  if (!dir.ok()) return Bad(std::string(dir.status().message()));
  ASSIGN_OR_RETURN(std::string prefix, FindPrefix(*dir));
  if (const ZipEntry* order = dir->Find(prefix + "byteorder"); order != nullptr) {
    const std::string value(reinterpret_cast<const char*>(data + order->data_offset), order->size);
    if (value != "little")
      return Bad(
          absl::StrCat("byteorder is \"", value, "\"; only little-endian archives are read"));
  }
  const ZipEntry* pkl = dir->Find(prefix + "data.pkl");
  ASSIGN_OR_RETURN(std::vector<TorchTensorRecord> records,
                   UnpickleTorchStateDict(data + pkl->data_offset, pkl->size));
  std::vector<Entry> entries;
  entries.reserve(records.size());
  for (TorchTensorRecord& r : records) {
    const std::string entry_name = absl::StrCat(prefix, "data/", r.storage.key);
    const ZipEntry* e = dir->Find(entry_name);
    if (e == nullptr) {
      return Bad(absl::StrCat("tensor \"", r.name, "\": its storage ", entry_name,
                              " is not in the archive"));
    }
    if (e->size != r.storage.bytes) {
      return Bad(absl::StrCat("tensor \"", r.name, "\": storage ", entry_name, " holds ", e->size,
                              " bytes but the pickle says ", r.storage.bytes));
    }
    if (DTypeSize(r.dtype) == 0) {
      return Bad(absl::StrCat("tensor \"", r.name, "\" has the packed dtype ",
                              std::string(DTypeName(r.dtype))));
    }
    // A contiguous view inside its storage (checked by the unpickler) is never larger than it; a
    // strided copy must not be either, so that an expanded (stride-0) view cannot ask for more
    // memory than the file.
    uint64_t copy_bytes = 0;
    if (!IsContiguous(r) && (__builtin_mul_overflow(static_cast<uint64_t>(NumElements(r.shape)),
                                                    DTypeSize(r.dtype), &copy_bytes) ||
                             copy_bytes > r.storage.bytes)) {
      return Bad(absl::StrCat("tensor \"", r.name, "\" is an overlapping view (shape ",
                              ShapeToString(r.shape), " over ", r.storage.bytes,
                              " storage bytes); save a contiguous copy"));
    }
    entries.push_back({std::move(r), data + e->data_offset});
  }
  return std::unique_ptr<WeightSource>(new TorchWeights(std::move(entries), std::move(storage)));
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenTorchCheckpoint(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile mf, MapFileReadOnly(path));
  absl::StatusOr<std::unique_ptr<WeightSource>> ws =
      TorchZipFromBuffer(mf.data, mf.size, mf.storage);
  if (!ws.ok())
    return absl::Status(ws.status().code(), absl::StrCat(path, ": ", ws.status().message()));
  return ws;
}

}  // namespace specontext
