#include "core/cuda/cuda_memory.h"

#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_check.h"
#include "core/log.h"

namespace specontext::cuda {
namespace {

// Makes `device` current for the scope and gives the calling thread its own device back: one backend's memory
// may be allocated or freed from a thread that drives another GPU (a tensor-parallel rank's tensors released
// elsewhere), and that thread's later launches must still go to its own device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device_) cudaSetDevice(device_);
  }
  ~DeviceScope() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  const int device_;
  int previous_ = -1;
};


// 256-byte granularity keeps every tensor aligned for 16-byte vector accesses and cp.async.
constexpr int64_t kAlign = 256;

int64_t RoundUp(int64_t bytes) { return std::max<int64_t>(kAlign, (bytes + kAlign - 1) / kAlign * kAlign); }

// Workspace sizes above 64 KiB go up to one of 16 classes per power of two (at most 1/16 more), so that a
// buffer that grows with the context (the selection's scores: a few hundred bytes more every decode step)
// keeps hitting the cache instead of paying a cudaMalloc each step (~150 µs on the H100, most of a 1B
// model's step; docs/benchmarks.md "Findings: device memory").
int64_t WorkspaceBytes(int64_t bytes) {
  constexpr int64_t kSmall = int64_t{64} << 10;
  if (bytes <= kSmall) return RoundUp(bytes);
  int shift = 0;
  while ((bytes >> shift) >= 32) ++shift;  // bytes >> shift in [16, 32): a class is 1 << shift wide
  const int64_t step = int64_t{1} << shift;
  return (bytes + step - 1) / step * step;
}

}  // namespace

struct CudaMemory::Pool {
  std::shared_ptr<CudaMemory> memory;
  std::mutex mu;
  std::map<int64_t, std::set<void*>> free;     // rounded size -> free blocks
  std::vector<std::pair<void*, int64_t>> owned;  // every block, for the release
  ~Pool() {
    for (auto& [p, bytes] : owned) memory->Release(p, bytes, MemoryKind::kGraphs);
  }
};

std::shared_ptr<CudaMemory::Pool> CudaMemory::NewPool() {
  auto pool = std::make_shared<Pool>();
  pool->memory = shared_from_this();
  return pool;
}

void CudaMemory::SetActivePool(std::shared_ptr<Pool> pool) {
  std::lock_guard<std::mutex> lock(mu_);
  active_pool_ = std::move(pool);
}

CudaMemory::~CudaMemory() { TrimWorkspaceCache(); }

bool CudaMemory::Reserve(int64_t bytes) {
  const int64_t total = total_.fetch_add(bytes) + bytes;
  if (limit_ > 0 && total > limit_) {
    total_.fetch_sub(bytes);
    return false;
  }
  int64_t peak = peak_.load();
  while (total > peak && !peak_.compare_exchange_weak(peak, total)) {
  }
  return true;
}

void CudaMemory::Unreserve(int64_t bytes) { total_.fetch_sub(bytes); }

absl::StatusOr<void*> CudaMemory::RawAlloc(int64_t bytes, MemoryKind kind) {
  if (kind == MemoryKind::kWorkspace) {
    std::vector<std::pair<void*, int64_t>> outgrown;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = ws_cache_.find(bytes);
      if (it != ws_cache_.end() && !it->second.empty()) {
        void* p = *it->second.begin();
        it->second.erase(it->second.begin());
        return p;  // already counted as workspace
      }
      // A buffer that grew into a new class leaves its old blocks behind: free the cached blocks between half
      // this size and it (rare: once per class change), so that the cache does not hoard them.
      if (bytes > (int64_t{64} << 10)) {
        for (auto c = ws_cache_.lower_bound(bytes / 2); c != ws_cache_.end() && c->first < bytes;) {
          for (void* q : c->second) outgrown.emplace_back(q, c->first);
          c = ws_cache_.erase(c);
        }
      }
    }
    if (!outgrown.empty()) {
      DeviceScope scope(device_);
      for (auto& [q, size] : outgrown) {
        cudaFree(q);
        bytes_[static_cast<size_t>(MemoryKind::kWorkspace)].fetch_sub(size);
        Unreserve(size);
      }
    }
  }
  if (!Reserve(bytes)) {
    // Cached workspace is the one thing that can be given back without the caller's help.
    TrimWorkspaceCache();
    if (!Reserve(bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "GPU memory limit ", limit_, " bytes exceeded: ", std::string(MemoryKindName(kind)),
          " allocation of ", bytes, " bytes with ", total_.load(), " bytes in use"));
    }
  }
  DeviceScope scope(device_);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, static_cast<size_t>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the runtime
    TrimWorkspaceCache();
    err = cudaMalloc(&p, static_cast<size_t>(bytes));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    Unreserve(bytes);
    return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes (",
                                                     std::string(MemoryKindName(kind)),
                                                     ") failed: ", cudaGetErrorString(err)));
  }
  bytes_[static_cast<size_t>(kind)].fetch_add(bytes);
  return p;
}

void CudaMemory::Release(void* p, int64_t bytes, MemoryKind kind) {
  if (kind == MemoryKind::kWorkspace) {
    std::lock_guard<std::mutex> lock(mu_);
    ws_cache_[bytes].insert(p);
    return;
  }
  DeviceScope scope(device_);
  cudaFree(p);  // errors at process exit (context gone) are harmless here
  bytes_[static_cast<size_t>(kind)].fetch_sub(bytes);
  Unreserve(bytes);
}

void CudaMemory::TrimWorkspaceCache() {
  std::map<int64_t, std::set<void*>> cache;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cache.swap(ws_cache_);
  }
  if (cache.empty()) return;
  DeviceScope scope(device_);
  for (auto& [bytes, blocks] : cache) {
    for (void* p : blocks) {
      cudaFree(p);
      bytes_[static_cast<size_t>(MemoryKind::kWorkspace)].fetch_sub(bytes);
      Unreserve(bytes);
    }
  }
}

absl::StatusOr<Tensor> CudaMemory::Alloc(DType dtype, Shape shape, MemoryKind kind) {
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("negative dimension in ", ShapeToString(shape)));
  }
  if (kind == MemoryKind::kCount) return absl::InvalidArgumentError("Alloc: kCount is not a memory kind");
  const int64_t raw = NumElements(shape) * static_cast<int64_t>(DTypeSize(dtype));
  const int64_t bytes = kind == MemoryKind::kWorkspace ? WorkspaceBytes(raw) : RoundUp(raw);
  std::shared_ptr<Pool> pool;
  if (kind == MemoryKind::kWorkspace) {
    std::lock_guard<std::mutex> lock(mu_);
    pool = active_pool_;
  }
  if (pool != nullptr) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(pool->mu);
      auto it = pool->free.find(bytes);
      if (it != pool->free.end() && !it->second.empty()) {
        p = *it->second.begin();
        it->second.erase(it->second.begin());
      }
    }
    if (p == nullptr) {
      auto p_or = RawAlloc(bytes, MemoryKind::kGraphs);
      if (!p_or.ok()) return p_or.status();
      p = *p_or;
      std::lock_guard<std::mutex> lock(pool->mu);
      pool->owned.emplace_back(p, bytes);
    }
    std::shared_ptr<void> storage(p, [pool, bytes](void* q) {
      std::lock_guard<std::mutex> lock(pool->mu);
      pool->free[bytes].insert(q);
    });
    return Tensor(p, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
  }
  auto p_or = RawAlloc(bytes, kind);
  if (!p_or.ok()) return p_or.status();
  void* p = *p_or;
  std::shared_ptr<CudaMemory> self = shared_from_this();
  std::shared_ptr<void> storage(p, [self, kind, bytes](void* q) { self->Release(q, bytes, kind); });
  return Tensor(p, dtype, std::move(shape), DeviceKind::kCuda, std::move(storage));
}

MemoryReport CudaMemory::Report() const {
  MemoryReport r;
  for (size_t i = 0; i < r.bytes.size(); ++i) r.bytes[i] = bytes_[i].load();
  r.total = total_.load();
  r.peak = peak_.load();
  r.limit = limit_;
  return r;
}

int64_t CudaMemory::Available() const {
  size_t free_bytes = 0, total_bytes = 0;
  DeviceScope scope(device_);
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();
    free_bytes = 0;
  }
  int64_t avail = static_cast<int64_t>(free_bytes);
  if (limit_ > 0) avail = std::min(avail, std::max<int64_t>(0, limit_ - total_.load()));
  return avail;
}

// ---- pinned, device-mapped host memory --------------------------------------------------------------

namespace {

constexpr size_t kSmallPage = size_t{4} << 10;
constexpr size_t kHugePage = size_t{2} << 20;

size_t RoundUpTo(size_t n, size_t a) { return (n + a - 1) / a * a; }

// The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("always [madvise] never"); "" if unreadable.
std::string ThpSetting() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(f, line)) return "";
  const size_t a = line.find('['), b = line.find(']');
  return a == std::string::npos || b == std::string::npos || b < a ? "" : line.substr(a + 1, b - a - 1);
}

absl::Status Errno(const std::string& what) {
  const int e = errno;
  const std::string msg = absl::StrCat(what, ": ", std::strerror(e));
  return e == ENOMEM ? absl::ResourceExhaustedError(msg) : absl::UnavailableError(msg);
}

// Page-locks and maps [p, p + n) for the device; device pointer must equal host pointer (UVA).
absl::Status RegisterMapped(void* p, size_t n) {
  cudaError_t err = cudaHostRegister(p, n, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("cudaHostRegister of ", n, " bytes failed: ",
                                                     cudaGetErrorString(err)));
  }
  void* dev = nullptr;
  err = cudaHostGetDevicePointer(&dev, p, 0);
  if (err != cudaSuccess || dev != p) {
    cudaGetLastError();
    cudaHostUnregister(p);
    return absl::FailedPreconditionError("registered host memory has a different device address (no UVA)");
  }
  return absl::OkStatus();
}

// An anonymous private mapping of `n` bytes starting on an `align` boundary (the excess is unmapped).
absl::StatusOr<char*> MapAligned(size_t n, size_t align, int extra_flags) {
  const size_t over = n + (align > kSmallPage ? align : 0);
  void* raw = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (raw == MAP_FAILED) return Errno(absl::StrCat("mmap of ", over, " bytes"));
  char* base = static_cast<char*>(raw);
  char* p = reinterpret_cast<char*>(RoundUpTo(reinterpret_cast<uintptr_t>(base), align));
  if (p > base) munmap(base, static_cast<size_t>(p - base));
  if (base + over > p + n) munmap(p + n, static_cast<size_t>(base + over - (p + n)));
  return p;
}

absl::StatusOr<MappedHostBlock> AllocRegistered(size_t bytes, HostPinMode mode) {
  const bool huge = mode != HostPinMode::kRegister4K;
  const size_t n = RoundUpTo(bytes, huge ? kHugePage : kSmallPage);
  char* p = nullptr;
  if (mode == HostPinMode::kHugeTlb) {
    // The pool's 2 MiB pages (MAP_HUGE_2MB); mmap fails at once when /proc/sys/vm/nr_hugepages is short.
    void* raw = mmap(nullptr, n, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | (21 << MAP_HUGE_SHIFT), -1, 0);
    if (raw == MAP_FAILED) {
      const int e = errno;
      return absl::UnavailableError(absl::StrCat("mmap(MAP_HUGETLB) of ", n, " bytes: ", std::strerror(e),
                                                 " (hugetlbfs pool too small? see /proc/meminfo HugePages_Free)"));
    }
    p = static_cast<char*>(raw);
  } else {
    if (mode == HostPinMode::kTransparentHuge && ThpSetting() == "never") {
      return absl::UnavailableError("transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled)");
    }
    auto m = MapAligned(n, huge ? kHugePage : kSmallPage, 0);
    if (!m.ok()) return m.status();
    p = *m;
    // Ask before the first fault, so the faults themselves get 2 MiB pages (or stay on 4 KiB for the baseline).
    if (madvise(p, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
      absl::Status st = Errno("madvise");
      munmap(p, n);
      return st;
    }
    // One write per page faults the range in now (zeroed pages), 2 MiB at a time when THP serves the fault.
    const size_t step = huge ? kHugePage : kSmallPage;
    for (size_t off = 0; off < n; off += step) p[off] = 0;
  }
  absl::Status st = RegisterMapped(p, n);
  if (!st.ok()) {
    munmap(p, n);
    return st;
  }
  return MappedHostBlock{p, bytes, n, mode};
}

}  // namespace

const char* HostPinModeName(HostPinMode mode) {
  switch (mode) {
    case HostPinMode::kCudaHostAlloc: return "hostalloc";
    case HostPinMode::kRegister4K: return "register4k";
    case HostPinMode::kTransparentHuge: return "thp";
    case HostPinMode::kHugeTlb: return "hugetlb";
  }
  return "?";
}

bool ParseHostPinMode(const std::string& name, HostPinMode* mode) {
  for (HostPinMode m : {HostPinMode::kCudaHostAlloc, HostPinMode::kRegister4K, HostPinMode::kTransparentHuge,
                        HostPinMode::kHugeTlb}) {
    if (name == HostPinModeName(m)) {
      *mode = m;
      return true;
    }
  }
  return false;
}

absl::StatusOr<MappedHostBlock> AllocMappedHost(int device, size_t bytes, HostPinMode mode) {
  if (bytes == 0) return absl::InvalidArgumentError("AllocMappedHost: 0 bytes");
  RETURN_IF_CUDA_ERROR(cudaSetDevice(device));
  if (mode != HostPinMode::kCudaHostAlloc) return AllocRegistered(bytes, mode);
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("cudaHostAlloc of ", bytes, " pinned bytes failed: ",
                                                     cudaGetErrorString(err)));
  }
  void* dev = nullptr;
  if (cudaHostGetDevicePointer(&dev, p, 0) != cudaSuccess || dev != p) {
    cudaGetLastError();
    cudaFreeHost(p);
    return absl::FailedPreconditionError("mapped pinned memory has a different device address (no UVA)");
  }
  return MappedHostBlock{p, bytes, bytes, mode};
}

absl::StatusOr<MappedHostBlock> AllocMappedHostOrFallback(int device, size_t bytes, HostPinMode preferred) {
  static std::atomic<bool> warned{false};
  HostPinMode mode = preferred;
  std::string why;
  while (true) {
    auto b = AllocMappedHost(device, bytes, mode);
    if (b.ok() || mode == HostPinMode::kCudaHostAlloc || b.status().code() == absl::StatusCode::kInvalidArgument) {
      if (b.ok() && !why.empty() && !warned.exchange(true)) {
        SPC_LOG(WARNING) << "host KV memory: falling back from the preferred pinning" << Kv("preferred", HostPinModeName(preferred))
                         << Kv("used", HostPinModeName(mode)) << Kv("reason", why);
      }
      return b;
    }
    if (why.empty()) why = b.status().ToString();
    mode = mode == HostPinMode::kHugeTlb ? HostPinMode::kTransparentHuge : HostPinMode::kCudaHostAlloc;
  }
}

void FreeMappedHost(const MappedHostBlock& block) {
  if (block.ptr == nullptr) return;
  if (block.mode == HostPinMode::kCudaHostAlloc) {
    cudaFreeHost(block.ptr);  // errors at process exit (context gone) are harmless here
    return;
  }
  cudaHostUnregister(block.ptr);
  munmap(block.ptr, block.mapped);
}

int64_t HugePageBytes(const void* ptr, size_t bytes) {
  std::ifstream f("/proc/self/smaps");
  if (!f) return -1;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(ptr), hi = lo + bytes;
  int64_t kb = 0;
  bool in = false;
  std::string line;
  while (std::getline(f, line)) {
    unsigned long long a = 0, b = 0;
    char dash = 0;
    std::istringstream head(line);
    // A VMA header starts "start-end perms ..." in hex; field lines start with a name and a colon.
    if ((head >> std::hex >> a >> dash >> b) && dash == '-' && line.find(':') > line.find(' ')) {
      in = a < hi && lo < b;
      continue;
    }
    if (!in) continue;
    for (const char* key : {"AnonHugePages:", "Private_Hugetlb:", "Shared_Hugetlb:"}) {
      if (line.rfind(key, 0) == 0) kb += std::atoll(line.c_str() + std::strlen(key));
    }
  }
  return kb * 1024;
}

}  // namespace specontext::cuda
