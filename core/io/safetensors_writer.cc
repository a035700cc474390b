// safetensors writers: a simple one for in-memory tensors and a multithreaded streaming one for
// multi-GB random checkpoints (each worker fills a chunk and pwrites it at its final offset).
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/io/safetensors.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

absl::Status WriteError(const std::string& path, int err) {
  return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(err)));
}

absl::Status PwriteAll(int fd, const void* buf, size_t n, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return WriteError(path, w < 0 ? errno : EIO);
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return absl::OkStatus();
}

// [u64 LE length][header padded with spaces so that the data section starts 8-byte aligned].
std::string HeaderPrefix(const std::string& header_json) {
  std::string h = header_json;
  while (h.size() % 8 != 0) h.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h;
}

}  // namespace

std::string SafetensorsHeaderJson(const std::vector<TensorSpec>& specs,
                                  const std::map<std::string, std::string>& metadata) {
  json root = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    root["__metadata__"] = m;
  }
  uint64_t offset = 0;
  for (const TensorSpec& s : specs) {
    json shape = json::array();
    for (int64_t d : s.shape) shape.push_back(d);
    const uint64_t end = offset + s.nbytes();
    root[s.name] = {{"dtype", std::string(SafetensorsDTypeName(s.dtype))},
                    {"shape", shape},
                    {"data_offsets", {offset, end}}};
    offset = end;
  }
  return root.dump();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    if (t.device() != DeviceKind::kCpu) {
      return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: tensor \"", name, "\" is not on the host"));
    }
    if (name == "__metadata__" || name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: invalid tensor name \"", name, "\""));
    }
    specs.push_back({name, t.dtype(), t.shape()});
  }
  const TensorFillFn fill = [&](size_t i, int64_t first, int64_t count, void* dst) {
    const size_t es = DTypeSize(tensors[i].second.dtype());
    std::memcpy(dst, static_cast<const uint8_t*>(tensors[i].second.data()) + first * es, count * es);
  };
  return WriteSafetensorsStreaming(path, specs, metadata, fill, 1);
}

absl::Status WriteSafetensorsStreaming(const std::string& path, const std::vector<TensorSpec>& specs,
                                       const std::map<std::string, std::string>& metadata,
                                       const TensorFillFn& fill, int num_threads, int64_t chunk_elements,
                                       const std::function<void(uint64_t, uint64_t)>& progress) {
  {
    std::map<std::string, int> seen;
    for (const TensorSpec& s : specs) {
      if (++seen[s.name] > 1) {
        return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: duplicate tensor \"", s.name, "\""));
      }
      // Chunks are whole elements; packed sub-byte formats are read and carried, never written here.
      if (DTypeSize(s.dtype) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: tensor \"", s.name, "\" has the packed dtype ",
                                                       std::string(SafetensorsDTypeName(s.dtype)),
                                                       ", which this writer does not write"));
      }
    }
  }
  const std::string prefix = HeaderPrefix(SafetensorsHeaderJson(specs, metadata));
  // Work items: (tensor, first element, count), in file order.
  struct Chunk {
    size_t tensor;
    int64_t first;
    int64_t count;
    uint64_t offset;
  };
  std::vector<Chunk> chunks;
  uint64_t offset = prefix.size();
  chunk_elements = std::max<int64_t>(chunk_elements, 1);
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t n = NumElements(specs[i].shape);
    const size_t es = DTypeSize(specs[i].dtype);
    for (int64_t first = 0; first < n; first += chunk_elements) {
      const int64_t count = std::min(chunk_elements, n - first);
      chunks.push_back({i, first, count, offset + static_cast<uint64_t>(first) * es});
    }
    offset += specs[i].nbytes();
  }
  const uint64_t total = offset;

  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return WriteError(path, errno);
  absl::Status status = PwriteAll(fd, prefix.data(), prefix.size(), 0, path);
  if (status.ok() && ::ftruncate(fd, static_cast<off_t>(total)) != 0) status = WriteError(path, errno);

  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{prefix.size()};
  std::mutex mu;  // guards `status` and serialises progress callbacks
  auto worker = [&] {
    std::vector<uint8_t> buf;
    for (;;) {
      const size_t c = next.fetch_add(1);
      if (c >= chunks.size()) return;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!status.ok()) return;
      }
      const Chunk& ch = chunks[c];
      const size_t bytes = static_cast<size_t>(ch.count) * DTypeSize(specs[ch.tensor].dtype);
      buf.resize(bytes);
      fill(ch.tensor, ch.first, ch.count, buf.data());
      absl::Status s = PwriteAll(fd, buf.data(), bytes, ch.offset, path);
      const uint64_t d = done.fetch_add(bytes) + bytes;
      std::lock_guard<std::mutex> lock(mu);
      if (!s.ok() && status.ok()) status = s;
      if (progress) progress(d, total);
    }
  };
  if (status.ok()) {
    const int n = std::max(1, std::min<int>(num_threads, static_cast<int>(chunks.size())));
    std::vector<std::thread> threads;
    for (int t = 1; t < n; ++t) threads.emplace_back(worker);
    worker();
    for (std::thread& t : threads) t.join();
  }
  if (::close(fd) != 0 && status.ok()) status = WriteError(path, errno);
  return status;
}

}  // namespace specontext
