#include "core/io/file_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace specontext {
namespace {

absl::Status ErrnoStatus(const std::string& what, const std::string& path, int err) {
  std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

// Opens a regular file; fills *size. Directories, FIFOs and devices are InvalidArgument.
absl::StatusOr<int> OpenRegular(const std::string& path, size_t* size) {
  // O_NONBLOCK so that opening a FIFO returns at once (instead of waiting for a writer) and the
  // fstat below can refuse it; it is cleared again for the regular files that pass.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return ErrnoStatus("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus("cannot set flags of", path, err);
  }
  *size = static_cast<size_t>(st.st_size);
  return fd;
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path, size_t max_bytes) {
  size_t size = 0;
  absl::StatusOr<int> fd = OpenRegular(path, &size);
  if (!fd.ok()) return fd.status();
  if (size > max_bytes) {
    ::close(*fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is ", size, " bytes, more than the limit of ", max_bytes));
  }
  std::string out(size, '\0');
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::read(*fd, out.data() + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(*fd);
      return ErrnoStatus("cannot read", path, err);
    }
    done += static_cast<size_t>(n);
  }
  ::close(*fd);
  return out;
}

absl::StatusOr<MappedFile> MapFileReadOnly(const std::string& path) {
  size_t size = 0;
  absl::StatusOr<int> fd = OpenRegular(path, &size);
  if (!fd.ok()) return fd.status();
  MappedFile mf;
  mf.size = size;
  if (size == 0) {  // mmap of length 0 fails; an empty file maps to nothing
    ::close(*fd);
    mf.storage = std::make_shared<int>(0);
    return mf;
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, *fd, 0);
  const int err = errno;
  ::close(*fd);  // the mapping stays valid after close
  if (p == MAP_FAILED) return ErrnoStatus("cannot mmap", path, err);
  mf.data = static_cast<const uint8_t*>(p);
  mf.storage = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
  return mf;
}

}  // namespace specontext
