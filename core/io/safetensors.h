// safetensors reading (memory-mapped, single file or sharded with model.safetensors.index.json) and writing.
//
// File layout: [u64 little-endian header length N][N bytes of JSON header][data section]. The header maps
// each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
// section) plus an optional "__metadata__" object of string -> string.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/io/weight_source.h"
#include "core/tensor.h"

namespace specontext {

/// Headers larger than this are rejected as corrupt (HF's own reader uses the same bound).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1000 * 1000;

/// One tensor of a parsed header. `begin`/`end` are byte offsets inside the data section.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

/// A validated header: entries in header order, metadata, and where the data section starts.
struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + header length
  uint64_t data_size = 0;   // bytes after data_start
};

/// Parses and validates the safetensors buffer `data[0, size)` (the whole file). Never reads outside
/// it. InvalidArgument with a message naming the problem (and tensor) for any malformed input.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size);

/// A WeightSource over one safetensors buffer held alive by `storage` (a mapping or any owner).
/// Tensors are host views into the buffer; they share `storage`. Data may be unaligned.
absl::StatusOr<std::unique_ptr<WeightSource>> SafetensorsFromBuffer(const uint8_t* data, size_t size,
                                                                   std::shared_ptr<void> storage);

/// Memory-maps one .safetensors file read-only. Errors are prefixed with the path.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensors(const std::string& path);

/// Opens a sharded checkpoint from its model.safetensors.index.json ("weight_map": name -> shard file,
/// shard files beside the index). Each shard is mapped once; a name listed in the index but absent
/// from its shard is an error. Names() is the index's list.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensorsIndex(const std::string& index_path);

/// Writes host tensors (any dtype, contiguous) to `path` in the order given, readable by HF safetensors:
/// the JSON header is space-padded so the data section starts 8-byte aligned.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

/// What a streaming writer needs to know about one tensor before its bytes exist.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  size_t nbytes() const { return DTypeBytes(dtype, static_cast<uint64_t>(NumElements(shape))); }
};

/// Produces elements [first, first + count) of tensor `index` (row-major) into `dst` in the spec's dtype.
/// Called concurrently from several threads, for disjoint ranges.
using TensorFillFn = std::function<void(size_t index, int64_t first, int64_t count, void* dst)>;

/// Streams a large file: lays out the header from `specs`, then `num_threads` threads fill chunks of
/// `chunk_elements` elements each and pwrite them, so memory stays bounded. `progress(bytes_done,
/// bytes_total)` (optional) is called from worker threads, serialised.
absl::Status WriteSafetensorsStreaming(const std::string& path, const std::vector<TensorSpec>& specs,
                                       const std::map<std::string, std::string>& metadata,
                                       const TensorFillFn& fill, int num_threads,
                                       int64_t chunk_elements = 1 << 20,
                                       const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

/// The header JSON (unpadded) a writer emits for `specs` in order, data laid out back to back.
std::string SafetensorsHeaderJson(const std::vector<TensorSpec>& specs,
                                  const std::map<std::string, std::string>& metadata);

}  // namespace specontext
