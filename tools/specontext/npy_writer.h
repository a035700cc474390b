// Streams a 2-D float32 array to a NumPy .npy file (format 1.0) row by row, so arrays larger than memory
// (8K positions × a 128K vocabulary of logits) can be written as they are produced.
#pragma once

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace specontext {

class NpyRowWriter {
 public:
  /// Creates `path` for `rows` × `cols` little-endian float32 values; the header is written now.
  static absl::StatusOr<NpyRowWriter> Create(const std::string& path, int64_t rows, int64_t cols);
  NpyRowWriter(NpyRowWriter&& other) noexcept;
  NpyRowWriter& operator=(NpyRowWriter&&) = delete;
  ~NpyRowWriter();

  /// Appends one row of `cols` values. FailedPrecondition past `rows` rows or for a wrong length.
  absl::Status Append(std::span<const float> row);
  /// Flushes and closes; an error if fewer than `rows` rows were appended or the write failed.
  absl::Status Close();

 private:
  NpyRowWriter(std::FILE* f, std::string path, int64_t rows, int64_t cols)
      : f_(f), path_(std::move(path)), rows_(rows), cols_(cols) {}
  std::FILE* f_ = nullptr;
  std::string path_;
  int64_t rows_ = 0, cols_ = 0, written_ = 0;
};

}  // namespace specontext
