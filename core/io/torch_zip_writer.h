// Writing state dicts the way torch.save (>= 1.6) does, so that `torch.load(path,
// weights_only=True)` and transformers read them: a stored (uncompressed) ZIP archive `archive/`
// holding data.pkl (a protocol-2 pickle of an OrderedDict name ->
// torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())), data/<i>
// (tensor i's bytes, each record 64-byte aligned as torch aligns them), byteorder, version,
// .format_version, .storage_alignment and .data/serialization_id. Used by the random-checkpoint
// tool for drafts in SafeAILab's pytorch_model.bin layout, and by tests. Archives past 4 GiB
// (ZIP64) are refused: shard them.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/io/safetensors.h"  // TensorSpec, TensorFillFn
#include "core/tensor.h"

namespace specontext {

/// The data.pkl of a state dict with one storage per tensor (storage key = its index in `specs`).
/// dtypes: those torch has storage types for (f32, f16, bf16, f64, i64, i32, i16, i8, u8, bool,
/// c64).
absl::StatusOr<std::string> TorchStateDictPickle(const std::vector<TensorSpec>& specs);

/// Streams a torch.save archive: `num_threads` threads fill chunks of `chunk_elements` elements
/// (CRC-32s combined in order), so memory stays bounded. `progress(bytes_done, bytes_total)` as for
/// safetensors.
absl::Status WriteTorchCheckpointStreaming(
    const std::string& path, const std::vector<TensorSpec>& specs, const TensorFillFn& fill,
    int num_threads, int64_t chunk_elements = 1 << 20,
    const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

/// Writes host tensors (contiguous) as a torch.save archive, in the order given.
absl::Status WriteTorchCheckpoint(const std::string& path,
                                  const std::vector<std::pair<std::string, Tensor>>& tensors);

/// CRC-32 (ZIP, reflected polynomial 0xedb88320) of `n` bytes, continuing from `crc` (0 to start).
uint32_t Crc32(uint32_t crc, const void* data, size_t n);
/// The CRC-32 of A ‖ B from crc(A), crc(B) and |B| (GF(2) polynomial arithmetic, no data needed).
uint32_t Crc32Combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace specontext
