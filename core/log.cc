#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <cstring>

#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace specontext {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kWarning)};

std::string Quote(std::string_view s) {
  if (!s.empty() && s.find_first_of(" \"=\n\t") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  out += '"';
  return out;
}

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "?";
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }
LogLevel GetLogLevel() { return static_cast<LogLevel>(g_level.load()); }

bool ParseLogLevel(std::string_view text, LogLevel* level) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning, LogLevel::kError}) {
    if (text == LevelName(l)) {
      *level = l;
      return true;
    }
  }
  return false;
}

LogLine::LogLine(LogLevel level, const char* file, int line)
    : level_(level), file_(file), line_(line) {}

LogLine& LogLine::operator<<(const Kv& kv) {
  fields_ += ' ';
  fields_ += kv.key;
  fields_ += '=';
  fields_ += Quote(kv.value);
  return *this;
}

LogLine::~LogLine() {
  const char* base = std::strrchr(file_, '/');
  std::string line = absl::StrCat(
      "ts=", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
      " level=", LevelName(level_), " src=", base ? base + 1 : file_, ":", line_,
      " msg=", Quote(msg_.str()), fields_, "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace specontext
