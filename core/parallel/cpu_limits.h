// How many CPUs this process may actually use, for the default thread count. A pod with a 2-CPU
// limit on a 64-core node still reports 64 from std::thread::hardware_concurrency(); so does a
// process pinned with taskset. Threads beyond the usable CPUs only queue behind each other, and a
// fork-join step then waits for whichever is descheduled.
#pragma once

#include <string>

namespace specontext {

// Where the cgroup limits are read from; tests point these at fake files.
struct CgroupFiles {
  std::string proc_self_cgroup = "/proc/self/cgroup";
  std::string cgroup_root = "/sys/fs/cgroup";
};

// The CPU bandwidth limit of the process's cgroup (the tightest of it and its ancestors), as whole
// CPUs rounded down and at least 1; 0 when there is no limit or it cannot be read. Reads cgroup v2
// `cpu.max` and cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
int CgroupCpuLimit(const CgroupFiles& files = {});

// CPUs in the process's affinity mask (sched_getaffinity); 0 when it cannot be read.
int AffinityCpuCount();

// The smallest of the known counts (a 0 is unknown); `fallback` when all are unknown; at least 1.
int CombineCpuCounts(int affinity, int cgroup_limit, int fallback);

// The default for --threads 0: the affinity mask and the cgroup limit, else hardware_concurrency().
int DefaultCpuThreads();

}  // namespace specontext
