// Structured, quiet-by-default logging. Debian 12's Abseil (20220623) predates absl/log, so this is
// the project's one logger: `SPC_LOG(INFO) << "loaded" << Kv("tensors", n);` writes one line
//   ts=2026-11-24T03:50:00.123Z level=info src=loader.cc:42 msg="loaded" tensors=291
// to stderr. The threshold is WARNING unless SetLogLevel() lowers it (the CLIs' --log_level flag).
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace specontext {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
// Parses "debug", "info", "warning", "error"; false when unknown.
bool ParseLogLevel(std::string_view text, LogLevel* level);

// A key=value field of a log line; values with spaces are quoted.
struct Kv {
  template <typename T>
  Kv(std::string_view key, const T& value) : key(key) {
    std::ostringstream os;
    os << value;
    this->value = os.str();
  }
  std::string key;
  std::string value;
};

class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  LogLine& operator<<(const Kv& kv);
  template <typename T>
  LogLine& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream msg_;
  std::string fields_;
};

}  // namespace specontext

#define SPC_LOG_LEVEL_DEBUG ::specontext::LogLevel::kDebug
#define SPC_LOG_LEVEL_INFO ::specontext::LogLevel::kInfo
#define SPC_LOG_LEVEL_WARNING ::specontext::LogLevel::kWarning
#define SPC_LOG_LEVEL_ERROR ::specontext::LogLevel::kError
#define SPC_LOG(level)                                                    \
  if (SPC_LOG_LEVEL_##level < ::specontext::GetLogLevel()) {              \
  } else                                                                  \
    ::specontext::LogLine(SPC_LOG_LEVEL_##level, __FILE__, __LINE__)
