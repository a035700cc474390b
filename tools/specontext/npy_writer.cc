#include "tools/specontext/npy_writer.h"

#include <bit>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace specontext {

absl::StatusOr<NpyRowWriter> NpyRowWriter::Create(const std::string& path, int64_t rows, int64_t cols) {
  if (rows < 0 || cols <= 0) return absl::InvalidArgumentError("npy: bad shape");
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  // Format 1.0: magic, version, u16 header length, then a Python dict literal padded with spaces and a
  // newline so that the data starts 64-byte aligned.
  std::string dict = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", rows, ", ", cols, "), }");
  const size_t preamble = 10;
  size_t total = preamble + dict.size() + 1;
  dict.append((64 - total % 64) % 64, ' ');
  dict.push_back('\n');
  const uint16_t len = static_cast<uint16_t>(dict.size());
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const uint8_t len_le[2] = {static_cast<uint8_t>(len & 0xff), static_cast<uint8_t>(len >> 8)};
  if (std::fwrite(magic, 1, 8, f) != 8 || std::fwrite(len_le, 1, 2, f) != 2 ||
      std::fwrite(dict.data(), 1, dict.size(), f) != dict.size()) {
    std::fclose(f);
    return absl::InternalError(absl::StrCat("cannot write ", path));
  }
  return NpyRowWriter(f, path, rows, cols);
}

NpyRowWriter::NpyRowWriter(NpyRowWriter&& o) noexcept
    : f_(o.f_), path_(std::move(o.path_)), rows_(o.rows_), cols_(o.cols_), written_(o.written_) {
  o.f_ = nullptr;
}

NpyRowWriter::~NpyRowWriter() {
  if (f_ != nullptr) std::fclose(f_);
}

absl::Status NpyRowWriter::Append(std::span<const float> row) {
  if (f_ == nullptr) return absl::FailedPreconditionError("npy: closed");
  if (static_cast<int64_t>(row.size()) != cols_ || written_ >= rows_) {
    return absl::FailedPreconditionError(absl::StrCat("npy: row ", written_, " of ", rows_, " with ", row.size(),
                                                      " values, expected ", cols_));
  }
  static_assert(std::endian::native == std::endian::little, "npy rows are written as little-endian f32");
  if (std::fwrite(row.data(), sizeof(float), row.size(), f_) != row.size()) {
    return absl::InternalError(absl::StrCat("cannot write ", path_, ": ", std::strerror(errno)));
  }
  ++written_;
  return absl::OkStatus();
}

absl::Status NpyRowWriter::Close() {
  if (f_ == nullptr) return absl::OkStatus();
  const bool ok = std::fclose(f_) == 0;
  f_ = nullptr;
  if (!ok) return absl::InternalError(absl::StrCat("cannot write ", path_));
  if (written_ != rows_) {
    return absl::InternalError(absl::StrCat(path_, ": ", written_, " rows written of ", rows_));
  }
  return absl::OkStatus();
}

}  // namespace specontext
