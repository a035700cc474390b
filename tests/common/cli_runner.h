// Runs a command-line binary for black-box tests and captures its exit status, stdout and stderr.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace specontext::testing {

struct CliRun {
  int exit_code = -1;     // -1 when the process did not exit normally
  bool signaled = false;  // killed by a signal (a crash)
  std::string out, err;
};

inline std::string ShellQuote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs `binary args...` through the shell with every argument quoted.
inline CliRun RunCli(const std::string& binary, const std::vector<std::string>& args) {
  static int n = 0;
  const std::string err_path =
      (std::filesystem::temp_directory_path() /
       ("spc_cli_err_" + std::to_string(getpid()) + "_" + std::to_string(n++)))
          .string();
  std::string cmd = binary;
  for (const auto& a : args) cmd += " " + ShellQuote(a);
  cmd += " 2>" + err_path;
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t got;
  while ((got = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), got);
  const int status = pclose(p);
  r.signaled = WIFSIGNALED(status);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  std::filesystem::remove(err_path);
  return r;
}

}  // namespace specontext::testing
