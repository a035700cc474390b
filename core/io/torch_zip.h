// PyTorch checkpoints written by torch.save (>= 1.6, the zip format): pytorch_model.bin, *.pt,
// *.pth.
//
// Archive layout (pytorch/pytorch torch/serialization.py `_save`): one top folder (`archive/`, or
// the file stem with older torch) holding data.pkl (the pickled state dict, read by the restricted
// unpickler of pickle.h: nothing in it is executed), data/<key> (the raw little-endian bytes of
// each storage, stored uncompressed, 64-byte aligned), byteorder ("little"), version and
// .format_version. Tensors are views (offset, sizes, strides) of storages; several tensors may
// share one storage.
//
// Refused, with a message saying so: the legacy non-zip torch.save format (torch < 1.6 or
// `_use_new_zipfile_serialization=False`), TorchScript archives (no data.pkl), compressed entries
// (an archive repacked by a zip tool), big-endian archives, storages whose archive entry has
// another size than the pickle says, views that reach outside their storage, and overlapping
// (stride-0) views.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/io/weight_source.h"

namespace specontext {

/// A WeightSource over a torch.save archive held in `data[0, size)`, kept alive by `storage`.
/// Contiguous tensors are views into the buffer (they share `storage`); other views are copied to
/// contiguous host memory when asked for. Tensors keep their stored dtype (bool masks and int64
/// maps included).
absl::StatusOr<std::unique_ptr<WeightSource>> TorchZipFromBuffer(const uint8_t* data, size_t size,
                                                                 std::shared_ptr<void> storage);

/// Memory-maps a torch.save file read-only. Errors are prefixed with the path.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenTorchCheckpoint(const std::string& path);

}  // namespace specontext
