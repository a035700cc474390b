#include "kvstore/process_liveness.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace specontext::kvstore {
namespace {

// Reads /proc/<pid>/stat into buf; false when the process is gone or /proc is unavailable.
bool ReadStat(pid_t pid, char* buf, size_t size) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n;
  do {
    n = ::read(fd, buf, size - 1);
  } while (n < 0 && errno == EINTR);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}

// Parses state (field 3) and starttime (field 22). The command name (field 2) may contain spaces
// and parentheses, so parsing starts after the last ')'.
bool ParseStat(const char* buf, char* state, uint64_t* start_ticks) {
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return false;
  ++p;
  int field = 2;
  while (*p != '\0') {
    while (*p == ' ') ++p;
    if (*p == '\0') break;
    ++field;
    if (field == 3) *state = *p;
    if (field == 22) {
      *start_ticks = std::strtoull(p, nullptr, 10);
      return true;
    }
    while (*p != ' ' && *p != '\0') ++p;
  }
  return false;
}

}  // namespace

uint64_t ProcessStartTicks(pid_t pid) {
  char buf[1024];
  if (!ReadStat(pid, buf, sizeof(buf))) return 0;
  char state = '?';
  uint64_t ticks = 0;
  if (!ParseStat(buf, &state, &ticks)) return 0;
  if (state == 'Z' || state == 'X' || state == 'x') return 0;
  return ticks;
}

bool IsProcessAlive(pid_t pid, uint64_t start_ticks) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  char buf[1024];
  if (!ReadStat(pid, buf, sizeof(buf))) {
    // No /proc: kill() said the pid exists (or we lack permission to signal it), trust that.
    return ::access("/proc/self/stat", R_OK) != 0;
  }
  char state = '?';
  uint64_t ticks = 0;
  if (!ParseStat(buf, &state, &ticks)) return true;  // unparseable: be conservative, keep it
  if (state == 'Z' || state == 'X' || state == 'x') return false;
  return start_ticks == 0 || ticks == start_ticks;
}

}  // namespace specontext::kvstore
