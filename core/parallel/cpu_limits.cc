#include "core/parallel/cpu_limits.h"

#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace specontext {
namespace {

std::optional<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in.good()) return std::nullopt;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Whole CPUs of a quota, rounded down: a step of a fork-join loop that runs more threads than the
// quota pays for is throttled for the rest of the period, which stalls the whole step.
int QuotaToCpus(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>(std::max<int64_t>(1, quota / period));
}

// cgroup v2 cpu.max: "max 100000" (no limit) or "QUOTA PERIOD".
int ParseCpuMax(absl::string_view text) {
  std::vector<absl::string_view> parts =
      absl::StrSplit(absl::StripAsciiWhitespace(text), ' ', absl::SkipWhitespace());
  if (parts.empty() || parts[0] == "max") return 0;
  int64_t quota = 0, period = 100000;  // the kernel's default period when only the quota is given
  if (!absl::SimpleAtoi(parts[0], &quota)) return 0;
  if (parts.size() > 1 && !absl::SimpleAtoi(parts[1], &period)) return 0;
  return QuotaToCpus(quota, period);
}

// cgroup v1: cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us.
int ReadCfsQuota(const std::string& dir) {
  const auto quota_text = ReadSmallFile(dir + "/cpu.cfs_quota_us");
  const auto period_text = ReadSmallFile(dir + "/cpu.cfs_period_us");
  if (!quota_text || !period_text) return 0;
  int64_t quota = 0, period = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(*quota_text), &quota) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(*period_text), &period)) {
    return 0;
  }
  return QuotaToCpus(quota, period);
}

int ReadCpuMax(const std::string& dir) {
  const auto text = ReadSmallFile(dir + "/cpu.max");
  return text ? ParseCpuMax(*text) : 0;
}

int Tighter(int a, int b) {
  if (a == 0) return b;
  if (b == 0) return a;
  return std::min(a, b);
}

// The tightest limit on `cgroup_path` and its ancestors under `mount`. A limit on any ancestor
// applies to the process too. Directories that do not exist are skipped: without a cgroup namespace
// a container sees the host's path in /proc/self/cgroup but has its own cgroup mounted at the root.
template <typename ReadLimit>
int TightestOnPath(const std::string& mount, absl::string_view cgroup_path, ReadLimit read_limit) {
  std::string rel(absl::StripSuffix(cgroup_path, "/"));
  int limit = 0;
  for (;;) {
    const std::string dir = mount + rel;
    std::error_code ec;
    if (std::filesystem::is_directory(dir, ec)) limit = Tighter(limit, read_limit(dir));
    if (rel.empty()) break;
    const size_t slash = rel.rfind('/');
    rel.resize(slash == std::string::npos ? 0 : slash);
  }
  return limit;
}

}  // namespace

int CgroupCpuLimit(const CgroupFiles& files) {
  const auto self = ReadSmallFile(files.proc_self_cgroup);
  if (!self) return 0;
  int limit = 0;
  // Lines are "ID:CONTROLLERS:PATH"; cgroup v2 is "0::PATH". A hybrid host lists both kinds.
  for (absl::string_view line : absl::StrSplit(*self, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (fields.size() != 3) continue;
    const absl::string_view controllers = fields[1], path = fields[2];
    if (fields[0] == "0" && controllers.empty()) {
      limit = Tighter(limit, TightestOnPath(files.cgroup_root, path, ReadCpuMax));
      continue;
    }
    std::vector<absl::string_view> names = absl::StrSplit(controllers, ',');
    if (std::find(names.begin(), names.end(), "cpu") == names.end()) continue;
    // The v1 cpu controller is mounted under a name listing its co-mounted controllers.
    for (const char* mount_name : {"cpu,cpuacct", "cpuacct,cpu", "cpu"}) {
      const std::string mount = files.cgroup_root + "/" + mount_name;
      std::error_code ec;
      if (!std::filesystem::is_directory(mount, ec)) continue;
      limit = Tighter(limit, TightestOnPath(mount, path, ReadCfsQuota));
      break;
    }
  }
  return limit;
}

int AffinityCpuCount() {
  // Hosts with more CPUs than a cpu_set_t holds need a bigger mask: grow it until the call fits.
  for (int cpus = CPU_SETSIZE; cpus <= (1 << 16); cpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (set == nullptr) return 0;
    const size_t size = CPU_ALLOC_SIZE(cpus);
    CPU_ZERO_S(size, set);
    const int rc = sched_getaffinity(0, size, set);
    const int count = rc == 0 ? CPU_COUNT_S(size, set) : 0;
    const bool too_small = rc != 0 && errno == EINVAL;
    CPU_FREE(set);
    if (!too_small) return count;
  }
  return 0;
}

int CombineCpuCounts(int affinity, int cgroup_limit, int fallback) {
  const int known = Tighter(std::max(0, affinity), std::max(0, cgroup_limit));
  return std::max(1, known > 0 ? known : fallback);
}

int DefaultCpuThreads() {
  return CombineCpuCounts(AffinityCpuCount(), CgroupCpuLimit(),
                          static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace specontext
