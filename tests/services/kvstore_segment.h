// A kvstore segment for one services test (tests built with SPC_KVSTORE_BIN): a name unique to the
// process, removed with `specontext-kvstore remove` on every exit path; `Inspect` reads its usage.
#pragma once

#include <unistd.h>

#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/services/service_harness.h"

namespace specontext::testing {

struct SegmentGuard {
  explicit SegmentGuard(const std::string& prefix)
      : name(absl::StrCat(prefix, getpid(), "_", std::random_device{}())) {}
  ~SegmentGuard() {
    int code = -1;
    RunCommand({SPC_KVSTORE_BIN, "remove", "--name", name}, &code);
  }
  SegmentGuard(const SegmentGuard&) = delete;
  SegmentGuard& operator=(const SegmentGuard&) = delete;
  std::string name;
};

// `specontext-kvstore inspect --json` of the segment; a null json when it fails (no such segment).
inline nlohmann::json Inspect(const std::string& name) {
  int code = -1;
  const std::string out = RunCommand({SPC_KVSTORE_BIN, "inspect", "--name", name, "--json"}, &code);
  if (code != 0) return nlohmann::json();
  return nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
}

}  // namespace specontext::testing
