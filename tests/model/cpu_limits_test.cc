// The default thread count (core/parallel/cpu_limits.h) on fake cgroup trees: v2 cpu.max and v1 CFS
// quota, limits on ancestors, no limit, unreadable or malformed files; and its combination with the
// affinity mask.
#include "core/parallel/cpu_limits.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace specontext {
namespace {

namespace fs = std::filesystem;

class CgroupCpuLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("spc_cgroup_" + std::to_string(getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_ / "sys");
    files_.proc_self_cgroup = (root_ / "self_cgroup").string();
    files_.cgroup_root = (root_ / "sys").string();
  }
  void TearDown() override { fs::remove_all(root_); }

  // Writes `text` to `rel` under the fake cgroup mount, making its directories.
  void Write(const std::string& rel, const std::string& text) {
    const fs::path p = root_ / "sys" / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  void SelfCgroup(const std::string& text) { std::ofstream(files_.proc_self_cgroup) << text; }

  fs::path root_;
  CgroupFiles files_;
};

TEST_F(CgroupCpuLimitTest, V2QuotaInWholeCpusRoundedDown) {
  SelfCgroup("0::/kubepods/pod1/ctr\n");
  Write("kubepods/pod1/ctr/cpu.max", "200000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 2);
  Write("kubepods/pod1/ctr/cpu.max", "250000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 2);
  Write("kubepods/pod1/ctr/cpu.max", "50000 100000\n");  // half a CPU: still one thread
  EXPECT_EQ(CgroupCpuLimit(files_), 1);
  Write("kubepods/pod1/ctr/cpu.max", "400000\n");  // the period defaults to 100 ms
  EXPECT_EQ(CgroupCpuLimit(files_), 4);
}

TEST_F(CgroupCpuLimitTest, V2NoLimit) {
  SelfCgroup("0::/user.slice/session\n");
  Write("user.slice/session/cpu.max", "max 100000\n");
  Write("user.slice/cpu.max", "max 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
}

TEST_F(CgroupCpuLimitTest, V2TightestAncestorWins) {
  SelfCgroup("0::/kubepods/pod1/ctr\n");
  Write("kubepods/pod1/ctr/cpu.max", "max 100000\n");
  Write("kubepods/pod1/cpu.max", "300000 100000\n");
  Write("kubepods/cpu.max", "3200000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 3);
}

// With a cgroup namespace the process sees itself at "/" and its own limit at the mount root.
TEST_F(CgroupCpuLimitTest, V2NamespacedRoot) {
  SelfCgroup("0::/\n");
  Write("cpu.max", "200000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 2);
}

TEST_F(CgroupCpuLimitTest, V1CfsQuota) {
  SelfCgroup("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n");
  Write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n");
  Write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 1);
  Write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
  Write("cpu,cpuacct/docker/cpu.cfs_quota_us", "600000\n");
  Write("cpu,cpuacct/docker/cpu.cfs_period_us", "200000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 3);
}

// Without a cgroup namespace a container sees the host's path but its own cgroup at the mount root.
TEST_F(CgroupCpuLimitTest, V1HostPathNotMounted) {
  SelfCgroup("3:cpu:/docker/0123abcd\n");
  Write("cpu/cpu.cfs_quota_us", "400000\n");
  Write("cpu/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 4);
}

TEST_F(CgroupCpuLimitTest, HybridTakesTheTighter) {
  SelfCgroup("0::/app\n5:cpuacct,cpu:/app\n");
  Write("app/cpu.max", "max 100000\n");
  Write("cpuacct,cpu/app/cpu.cfs_quota_us", "200000\n");
  Write("cpuacct,cpu/app/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 2);
}

TEST_F(CgroupCpuLimitTest, MissingOrMalformedMeansUnknown) {
  EXPECT_EQ(CgroupCpuLimit(files_), 0);  // no /proc/self/cgroup
  SelfCgroup("0::/a\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);  // no cpu.max anywhere
  Write("a/cpu.max", "lots 100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
  Write("a/cpu.max", "200000 0\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
  Write("a/cpu.max", "");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
  SelfCgroup("garbage\n7:memory:/a\n");  // no cpu controller
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
  SelfCgroup("4:cpu:/a\n");  // v1 quota without its period
  Write("cpu/a/cpu.cfs_quota_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(files_), 0);
}

TEST(CombineCpuCounts, SmallestKnownCount) {
  EXPECT_EQ(CombineCpuCounts(64, 2, 64), 2);  // a 2-CPU pod on a 64-core node
  EXPECT_EQ(CombineCpuCounts(4, 0, 64), 4);   // taskset to 4 CPUs, no quota
  EXPECT_EQ(CombineCpuCounts(8, 16, 64), 8);
  EXPECT_EQ(CombineCpuCounts(0, 0, 12), 12);  // nothing known: hardware_concurrency()
  EXPECT_EQ(CombineCpuCounts(0, 0, 0), 1);
  EXPECT_EQ(CombineCpuCounts(0, 3, 0), 3);
}

TEST(AffinityCpuCount, MatchesTheMask) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  EXPECT_EQ(AffinityCpuCount(), CPU_COUNT(&set));
  EXPECT_GE(DefaultCpuThreads(), 1);
  EXPECT_LE(DefaultCpuThreads(), AffinityCpuCount());
}

// The mask of a pinned thread is what counts, not the machine's CPUs.
TEST(AffinityCpuCount, FollowsAPinnedMask) {
  cpu_set_t old_set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(old_set), &old_set), 0);
  int first = -1;
  for (int c = 0; c < CPU_SETSIZE && first < 0; ++c) {
    if (CPU_ISSET(c, &old_set)) first = c;
  }
  ASSERT_GE(first, 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  EXPECT_EQ(AffinityCpuCount(), 1);
  EXPECT_EQ(DefaultCpuThreads(), 1);
  ASSERT_EQ(sched_setaffinity(0, sizeof(old_set), &old_set), 0);
}

}  // namespace
}  // namespace specontext
