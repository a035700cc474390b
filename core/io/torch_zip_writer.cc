// torch.save-compatible writer (torch_zip_writer.h). Zip records: PKWARE APPNOTE.TXT 4.3; the
// pickle follows what torch.save emits for a state dict (torch/serialization.py `_save`,
// torch/_tensor.py `_reduce_ex_internal`).
#include "core/io/torch_zip_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

constexpr uint32_t kPoly = 0xedb88320u;  // CRC-32 (ZIP), reflected
constexpr uint64_t kAlign = 64;          // torch aligns every record's data to 64 bytes
constexpr uint64_t kZip32Limit = 0xffffffffu;

struct CrcTable {
  uint32_t t[256];
  constexpr CrcTable() : t() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[i] = c;
    }
  }
};
constexpr CrcTable kCrc;

// a·b mod P for polynomials in the reflected representation (bit 31 is x^0).
uint32_t MulModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;  // b·x
  }
  return product;
}

std::optional<std::string_view> StorageType(DType d) {
  switch (d) {
    case DType::kF32:
      return "FloatStorage";
    case DType::kF16:
      return "HalfStorage";
    case DType::kBF16:
      return "BFloat16Storage";
    case DType::kF64:
      return "DoubleStorage";
    case DType::kI64:
      return "LongStorage";
    case DType::kI32:
      return "IntStorage";
    case DType::kI16:
      return "ShortStorage";
    case DType::kI8:
      return "CharStorage";
    case DType::kU8:
      return "ByteStorage";
    case DType::kBool:
      return "BoolStorage";
    case DType::kC64:
      return "ComplexFloatStorage";
    default:
      return std::nullopt;
  }
}

void Le(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Protocol-2 opcodes: BININT1/BININT2/BININT, LONG1 past 31 bits; BINUNICODE strings.
void PickleInt(std::string* p, int64_t v) {
  if (v >= 0 && v < 256) {
    p->push_back('K');
    Le(p, static_cast<uint64_t>(v), 1);
  } else if (v >= 0 && v < 65536) {
    p->push_back('M');
    Le(p, static_cast<uint64_t>(v), 2);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    p->push_back('J');
    Le(p, static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
  } else {
    p->append("\x8a\x08", 2);
    Le(p, static_cast<uint64_t>(v), 8);
  }
}
void PickleString(std::string* p, std::string_view s) {
  p->push_back('X');
  Le(p, s.size(), 4);
  p->append(s);
}
void PickleIntTuple(std::string* p, const std::vector<int64_t>& v) {
  p->push_back('(');
  for (int64_t x : v) PickleInt(p, x);
  p->push_back('t');
}

// One archive record: literal bytes, or tensor `tensor`'s bytes.
struct Record {
  std::string name;
  std::string literal;
  int64_t tensor = -1;
  uint64_t size = 0, header = 0, data = 0;
  uint32_t crc = 0;
};

std::string LocalHeader(const Record& r) {
  std::string h;
  Le(&h, 0x04034b50, 4);
  Le(&h, 20, 2);  // version needed: 2.0
  Le(&h, 0, 2);   // flags
  Le(&h, 0, 2);   // method: stored
  Le(&h, 0, 4);   // time, date
  Le(&h, r.crc, 4);
  Le(&h, r.size, 4);
  Le(&h, r.size, 4);
  Le(&h, r.name.size(), 2);
  const uint64_t extra = r.data - r.header - 30 - r.name.size();
  Le(&h, extra, 2);
  h += r.name;
  // Padding extra field (id "FB", as torch writes it) so that the data starts 64-byte aligned.
  Le(&h, 0x4246, 2);
  Le(&h, extra - 4, 2);
  h.append(extra - 4, 'Z');
  return h;
}

std::string CentralDirectory(const std::vector<Record>& records, uint64_t cd_offset) {
  std::string cd;
  for (const Record& r : records) {
    Le(&cd, 0x02014b50, 4);
    Le(&cd, 20, 2);  // made by
    Le(&cd, 20, 2);  // needed
    Le(&cd, 0, 2);
    Le(&cd, 0, 2);
    Le(&cd, 0, 4);
    Le(&cd, r.crc, 4);
    Le(&cd, r.size, 4);
    Le(&cd, r.size, 4);
    Le(&cd, r.name.size(), 2);
    Le(&cd, 0, 2);  // extra
    Le(&cd, 0, 2);  // comment
    Le(&cd, 0, 2);  // disk
    Le(&cd, 0, 2);  // internal attributes
    Le(&cd, 0, 4);  // external attributes
    Le(&cd, r.header, 4);
    cd += r.name;
  }
  const uint64_t size = cd.size();
  Le(&cd, 0x06054b50, 4);
  Le(&cd, 0, 4);  // disks
  Le(&cd, records.size(), 2);
  Le(&cd, records.size(), 2);
  Le(&cd, size, 4);
  Le(&cd, cd_offset, 4);
  Le(&cd, 0, 2);  // comment
  return cd;
}

absl::Status Pwrite(int fd, const void* data, size_t n, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return absl::OkStatus();
}

}  // namespace

uint32_t Crc32(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrc.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t Crc32Combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(A ‖ B) = crc(A)·x^(8|B|) ⊕ crc(B) mod P (the pre/post inversions cancel). x^(8n) by
  // squaring.
  uint32_t shift = 1u << 31;        // x^0
  uint32_t power = 1u << (31 - 8);  // x^8
  for (uint64_t n = len_b; n != 0; n >>= 1) {
    if (n & 1) shift = MulModP(shift, power);
    power = MulModP(power, power);
  }
  return MulModP(shift, crc_a) ^ crc_b;
}

absl::StatusOr<std::string> TorchStateDictPickle(const std::vector<TensorSpec>& specs) {
  std::string p =
      "\x80\x02"
      "ccollections\nOrderedDict\n)R(";
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const std::optional<std::string_view> storage = StorageType(s.dtype);
    if (!storage) {
      return absl::InvalidArgumentError(
          absl::StrCat("torch checkpoint: tensor \"", s.name, "\" has dtype ",
                       std::string(DTypeName(s.dtype)), ", which has no torch storage type"));
    }
    std::vector<int64_t> shape(s.shape.begin(), s.shape.end()), stride(shape.size(), 1);
    for (size_t d = shape.size(); d-- > 1;) stride[d - 1] = stride[d] * shape[d];
    PickleString(&p, s.name);
    p += "ctorch._utils\n_rebuild_tensor_v2\n((";  // the function, its argument tuple, the
                                                   // persistent id
    PickleString(&p, "storage");
    p += absl::StrCat("ctorch\n", std::string(*storage), "\n");
    PickleString(&p, std::to_string(i));
    PickleString(&p, "cpu");
    PickleInt(&p, NumElements(s.shape));
    p += "tQ";  // the persistent id tuple, loaded
    PickleInt(&p, 0);
    PickleIntTuple(&p, shape);
    PickleIntTuple(&p, stride);
    p += "\x89"
         "ccollections\nOrderedDict\n)R"
         "tR";  // requires_grad False, hooks; the call
  }
  p += "u.";
  return p;
}

absl::Status WriteTorchCheckpointStreaming(
    const std::string& path, const std::vector<TensorSpec>& specs, const TensorFillFn& fill,
    int num_threads, int64_t chunk_elements,
    const std::function<void(uint64_t, uint64_t)>& progress) {
  ASSIGN_OR_RETURN(std::string pickle, TorchStateDictPickle(specs));
  // The folder is named after the file, as torch.save names it.
  std::string stem = path.substr(path.find_last_of('/') + 1);
  if (const size_t dot = stem.find('.'); dot != std::string::npos && dot > 0)
    stem = stem.substr(0, dot);
  if (stem.empty()) stem = "archive";
  std::vector<Record> records;
  records.push_back({stem + "/data.pkl", pickle});
  records.push_back({stem + "/.format_version", "1"});
  records.push_back({stem + "/.storage_alignment", "64"});
  records.push_back({stem + "/byteorder", "little"});
  for (size_t i = 0; i < specs.size(); ++i) {
    Record r{absl::StrCat(stem, "/data/", i), ""};
    r.tensor = static_cast<int64_t>(i);
    r.size = specs[i].nbytes();
    records.push_back(std::move(r));
  }
  records.push_back({stem + "/version", "3\n"});
  records.push_back({stem + "/.data/serialization_id", std::string(40, '0')});
  uint64_t offset = 0;
  for (Record& r : records) {
    if (r.tensor < 0) {
      r.size = r.literal.size();
      r.crc = Crc32(0, r.literal.data(), r.literal.size());
    }
    r.header = offset;
    r.data = (offset + 30 + r.name.size() + 4 + kAlign - 1) / kAlign *
             kAlign;  // room for the padding field
    offset = r.data + r.size;
  }
  const uint64_t cd_offset = offset;
  if (cd_offset > kZip32Limit || records.size() > 0xffff) {
    return absl::InvalidArgumentError(
        absl::StrCat("torch checkpoint: ", path, " would be ", cd_offset,
                     " bytes; archives past 4 GiB need ZIP64, which this writer does "
                     "not write (shard the checkpoint)"));
  }
  // Chunks of the tensors, filled in parallel; their CRCs are combined in order afterwards.
  struct Chunk {
    size_t record;
    int64_t first, count;
    uint64_t offset;
    uint32_t crc = 0;
  };
  std::vector<Chunk> chunks;
  chunk_elements = std::max<int64_t>(chunk_elements, 1);
  for (size_t ri = 0; ri < records.size(); ++ri) {
    const Record& r = records[ri];
    if (r.tensor < 0) continue;
    const TensorSpec& s = specs[static_cast<size_t>(r.tensor)];
    const int64_t n = NumElements(s.shape);
    for (int64_t first = 0; first < n; first += chunk_elements) {
      chunks.push_back(
          {ri, first, std::min(chunk_elements, n - first), r.data + first * DTypeSize(s.dtype)});
    }
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  absl::Status status;
  std::mutex mu;  // guards status, serialises progress
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  auto worker = [&] {
    std::vector<uint8_t> buf;
    for (size_t c; (c = next.fetch_add(1)) < chunks.size();) {
      Chunk& ch = chunks[c];
      const TensorSpec& s = specs[static_cast<size_t>(records[ch.record].tensor)];
      buf.resize(static_cast<size_t>(ch.count) * DTypeSize(s.dtype));
      fill(static_cast<size_t>(records[ch.record].tensor), ch.first, ch.count, buf.data());
      ch.crc = Crc32(0, buf.data(), buf.size());
      absl::Status st = Pwrite(fd, buf.data(), buf.size(), ch.offset, path);
      const uint64_t d = done.fetch_add(buf.size()) + buf.size();
      std::lock_guard<std::mutex> lock(mu);
      if (!st.ok() && status.ok()) status = st;
      if (!status.ok()) return;
      if (progress) progress(d, cd_offset);
    }
  };
  const int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(chunks.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  for (const Chunk& ch : chunks) {  // chunks of a record are in order
    const Record& r = records[ch.record];
    const uint64_t len =
        static_cast<uint64_t>(ch.count) * DTypeSize(specs[static_cast<size_t>(r.tensor)].dtype);
    records[ch.record].crc = ch.first == 0 ? ch.crc : Crc32Combine(r.crc, ch.crc, len);
  }
  for (const Record& r : records) {
    if (!status.ok()) break;
    status = Pwrite(fd, LocalHeader(r).data(), r.data - r.header, r.header, path);
    if (status.ok() && r.tensor < 0)
      status = Pwrite(fd, r.literal.data(), r.literal.size(), r.data, path);
  }
  if (status.ok()) {
    const std::string cd = CentralDirectory(records, cd_offset);
    status = Pwrite(fd, cd.data(), cd.size(), cd_offset, path);
  }
  if (::close(fd) != 0 && status.ok())
    status = absl::InternalError(absl::StrCat("cannot close ", path));
  return status;
}

absl::Status WriteTorchCheckpoint(const std::string& path,
                                  const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    if (t.device() != DeviceKind::kCpu) {
      return absl::InvalidArgumentError(
          absl::StrCat("torch checkpoint: tensor \"", name, "\" is not on the host"));
    }
    specs.push_back({name, t.dtype(), t.shape()});
  }
  const TensorFillFn fill = [&](size_t i, int64_t first, int64_t count, void* dst) {
    const size_t es = DTypeSize(tensors[i].second.dtype());
    std::memcpy(dst, static_cast<const uint8_t*>(tensors[i].second.data()) + first * es,
                count * es);
  };
  return WriteTorchCheckpointStreaming(path, specs, fill, 1);
}

}  // namespace specontext
