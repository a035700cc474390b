// Small file helpers shared by the loaders: bounded reads and read-only memory maps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace specontext {

/// Reads a whole (text) file, refusing files larger than `max_bytes`. NotFound when absent.
absl::StatusOr<std::string> ReadFileToString(const std::string& path, size_t max_bytes);

/// A read-only, private memory map of a whole file. `storage` owns the mapping (munmap on release),
/// so tensors that alias `data` keep it alive by sharing `storage`.
struct MappedFile {
  const uint8_t* data = nullptr;  // nullptr for an empty file
  size_t size = 0;
  std::shared_ptr<void> storage;
};

/// Maps `path` read-only. NotFound when absent, InvalidArgument for a directory.
absl::StatusOr<MappedFile> MapFileReadOnly(const std::string& path);

}  // namespace specontext
