// Command-line arguments in the `--name value` / `--name=value` form the CLIs document
// (dashes, as in `--max-new-tokens`). Unknown flags, missing values and unparsable numbers are
// errors that name the flag; the caller prints them and exits non-zero. `--help` and `-h` ask for
// the usage instead, wherever they stand.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

class Args {
 public:
  struct Flag {
    std::string name;     // without dashes
    std::string help;
    bool is_bool = false; // takes no value
    bool repeated = false;
    std::string default_value;
  };

  void Define(Flag flag);
  // Parses argv[first..argc). Positional words are kept in positional(). When `--help` or `-h` is
  // among the words (not as a flag's value), the result is OK and help_requested() is true,
  // whatever else is wrong with the line: someone asking for the usage should get it.
  absl::Status Parse(int argc, char** argv, int first = 1);
  bool help_requested() const { return help_requested_; }

  bool Has(const std::string& name) const;
  std::string GetString(const std::string& name) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name) const;
  absl::StatusOr<double> GetDouble(const std::string& name) const;
  // A non-empty comma list of positive integers, e.g. --batch 1,4,32.
  absl::StatusOr<std::vector<int64_t>> GetPositiveIntList(const std::string& name) const;
  bool GetBool(const std::string& name) const;
  // Sizes like 4GiB, 512MiB, 1000000 (bytes).
  absl::StatusOr<int64_t> GetBytes(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  // One entry per flag: its name, its help and its default, unless the help tells it already.
  std::string Usage() const;

 private:
  const Flag* Find(const std::string& name) const;
  std::vector<Flag> flags_;
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
  bool help_requested_ = false;
};

// Sets the process log level from --log-level (debug, info, warning, error).
absl::Status ApplyLogLevelFlag(const Args& args);

// The usage text of a command: "usage: NAME [flags]" and the flags.
std::string CommandUsage(const std::string& name, const Args& args);

// The shared shape of a command's main: parses argv[first..) into `args` (usage error: message,
// flags and exit 2; stray positional words are errors; --help or -h: the usage on stdout, exit 0),
// then runs `run` (error: message and exit 1). `name` prefixes the messages ("specontext bench").
int RunCommand(const std::string& name, Args& args, int argc, char** argv, int first,
               const std::function<absl::Status(const Args&)>& run);

}  // namespace specontext
