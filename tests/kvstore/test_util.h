// Helpers shared by the kvstore tests: unique, self-cleaning segment names and fresh randomness.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "kvstore/kv_store.h"

namespace specontext::kvstore::testing {

/// A segment name unique to this process and call ("spc_test_<pid>_<tag>_<n>"), unlinked when the
/// object goes out of scope (whether or not the test created it).
class ScopedSegmentName {
 public:
  explicit ScopedSegmentName(const std::string& tag) {
    static std::atomic<int> counter{0};
    name_ = "spc_test_" + std::to_string(::getpid()) + "_" + tag + "_" +
            std::to_string(counter.fetch_add(1));
    ::shm_unlink(("/" + name_).c_str());
  }
  ~ScopedSegmentName() { ::shm_unlink(("/" + name_).c_str()); }
  const std::string& str() const { return name_; }

 private:
  std::string name_;
};

/// A fresh seed per run, printed so a failure can be replayed.
inline uint64_t FreshSeed() {
  const uint64_t seed = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

inline KvStoreOptions Options(const std::string& name, uint64_t blocks, uint64_t block_bytes,
                              OpenMode mode = OpenMode::kCreateOrAttach) {
  KvStoreOptions o;
  o.name = name;
  o.mode = mode;
  Geometry g;
  g.block_count = blocks;
  g.block_bytes = block_bytes;
  g.max_sequences = 64;
  g.max_owners = 16;
  o.geometry = g;
  return o;
}

}  // namespace specontext::kvstore::testing
