// Creating, attaching, mapping and closing segments; owner registration; the segment mutex.
#include <ctime>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "kvstore/kv_store.h"
#include "kvstore/kv_store_lock.h"
#include "kvstore/process_liveness.h"

namespace specontext::kvstore {
namespace {

absl::Status Errno(const std::string& what, int err) {
  std::string msg = absl::StrCat("kvstore: ", what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(msg);
    case EEXIST:
      return absl::AlreadyExistsError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case ENOMEM:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

uint64_t LoadMagic(const SegmentHeader* h) {
  return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(const_cast<char*>(h->magic)))
      .load(std::memory_order_acquire);
}

}  // namespace

absl::Status InitSharedMutex(pthread_mutex_t* m) {
  pthread_mutexattr_t attr;
  if (int rc = pthread_mutexattr_init(&attr); rc != 0) return Errno("mutexattr_init", rc);
  int rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  if (rc == 0) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  // Error-checking: a thread relocking turns into EDEADLK instead of a silent hang.
  if (rc == 0) rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
  if (rc == 0) rc = pthread_mutex_init(m, &attr);
  pthread_mutexattr_destroy(&attr);
  return rc == 0 ? absl::OkStatus() : Errno("initialising the segment mutex", rc);
}

absl::StatusOr<std::string> KvStore::NormalizeName(const std::string& name) {
  std::string n = (!name.empty() && name[0] == '/') ? name : "/" + name;
  if (n.size() < 2 || n.size() > 251) {
    return absl::InvalidArgumentError(
        absl::StrCat("kvstore: segment name must have 1 to 250 characters, got '", name, "'"));
  }
  if (n.find('/', 1) != std::string::npos || n == "/." || n == "/..") {
    return absl::InvalidArgumentError(
        absl::StrCat("kvstore: segment name '", name, "' must not contain '/' after the first"));
  }
  return n;
}

absl::Status KvStore::Remove(const std::string& name) {
  ASSIGN_OR_RETURN(std::string n, NormalizeName(name));
  if (::shm_unlink(n.c_str()) != 0) return Errno(absl::StrCat("removing segment ", n), errno);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<KvStore>> KvStore::Open(const KvStoreOptions& options) {
  std::unique_ptr<KvStore> store(new KvStore());
  ASSIGN_OR_RETURN(store->name_, NormalizeName(options.name));
  store->apply_hook_ = options.apply_hook_for_testing;
  store->lock_timeout_ = options.lock_timeout;
  store->pid_ = ::getpid();
  const bool may_create = options.mode != OpenMode::kAttach;
  if (may_create) {
    if (!options.geometry.has_value()) {
      return absl::InvalidArgumentError("kvstore: creating a segment needs a geometry");
    }
    RETURN_IF_ERROR(ComputeLayout(*options.geometry).status());
  }
  int fd = -1;
  if (may_create) {
    fd = ::shm_open(store->name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0) {
      store->fd_ = fd;
      absl::Status st = store->CreateSegment(options, fd);
      if (!st.ok()) {
        // Do not leave a half-built segment behind under the name.
        ::shm_unlink(store->name_.c_str());
        return st;
      }
    } else if (errno != EEXIST || options.mode == OpenMode::kCreate) {
      return Errno(absl::StrCat("creating segment ", store->name_), errno);
    }
  }
  if (fd < 0) {
    fd = ::shm_open(store->name_.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return Errno(absl::StrCat("opening segment ", store->name_), errno);
    store->fd_ = fd;
    RETURN_IF_ERROR(store->AttachSegment(options, fd));
  }
  if (options.register_owner) {
    RETURN_IF_ERROR(store->RegisterOwner(options.owner_label));
  }
  return store;
}

absl::Status KvStore::MapSegment(int fd, uint64_t bytes, bool huge) {
  void* p = MAP_FAILED;
  if (huge) {
    p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_HUGETLB, fd, 0);
    if (p == MAP_FAILED) {
      // POSIX shm lives on tmpfs, which only takes MAP_HUGETLB when /dev/shm is hugetlbfs; fall
      // back to transparent huge pages advice.
      SPC_LOG(INFO) << "kvstore: MAP_HUGETLB unavailable, using THP advice" << Kv("segment", name_)
                    << Kv("error", std::strerror(errno));
    } else {
      huge_pages_active_ = true;
    }
  }
  if (p == MAP_FAILED) p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Errno(absl::StrCat("mapping segment ", name_), errno);
  if (huge && !huge_pages_active_) ::madvise(p, bytes, MADV_HUGEPAGE);
  base_ = static_cast<uint8_t*>(p);
  mapping_bytes_ = bytes;
  return absl::OkStatus();
}

absl::Status KvStore::CreateSegment(const KvStoreOptions& o, int fd) {
  geometry_ = *o.geometry;
  ASSIGN_OR_RETURN(Layout layout, ComputeLayout(geometry_));
  if (::ftruncate(fd, static_cast<off_t>(layout.segment_bytes)) != 0) {
    return Errno(absl::StrCat("sizing segment ", name_), errno);
  }
  // Reserve the pages now: tmpfs allocates lazily and a full /dev/shm would otherwise surface as
  // SIGBUS on first touch of a block, long after creation.
  if (int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(layout.segment_bytes)); rc != 0) {
    return Errno(absl::StrCat("reserving ", layout.segment_bytes, " bytes for ", name_,
                              " (is /dev/shm large enough?)"),
                 rc);
  }
  RETURN_IF_ERROR(MapSegment(fd, layout.segment_bytes, geometry_.huge_pages));
  created_ = true;
  header_ = reinterpret_cast<SegmentHeader*>(base_);
  state_ = reinterpret_cast<SharedState*>(base_ + layout.state_offset);
  owners_ = reinterpret_cast<OwnerRecord*>(base_ + layout.owners_offset);
  seqs_ = reinterpret_cast<SequenceRecord*>(base_ + layout.sequences_offset);
  meta_ = reinterpret_cast<BlockMeta*>(base_ + layout.blocks_offset);
  data_ = base_ + layout.data_offset;
  // The mapping starts zeroed (fresh ftruncate): owners and sequences are already "not in use".
  RETURN_IF_ERROR(InitSharedMutex(&state_->mutex));
  state_->next_generation = 1;
  state_->op_in_progress = kOpNone;
  RebuildFreeList();  // every block free, linked in index order
  SegmentHeader h = MakeHeader(geometry_, layout, absl::ToUnixNanos(absl::Now()));
  // Publish everything but the magic, then the magic with release order: an attacher that sees the
  // magic sees a complete segment.
  std::memcpy(reinterpret_cast<uint8_t*>(header_) + sizeof(h.magic),
              reinterpret_cast<const uint8_t*>(&h) + sizeof(h.magic), sizeof(h) - sizeof(h.magic));
  uint64_t magic;
  std::memcpy(&magic, h.magic, sizeof(magic));
  std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(header_->magic))
      .store(magic, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status KvStore::AttachSegment(const KvStoreOptions& o, int fd) {
  const absl::Time deadline = absl::Now() + o.init_wait;
  struct stat st;
  // A creator may still be sizing or filling the segment: wait for a size and a magic.
  for (;;) {
    if (::fstat(fd, &st) != 0) return Errno(absl::StrCat("stat of segment ", name_), errno);
    if (static_cast<uint64_t>(st.st_size) >= sizeof(SegmentHeader)) {
      SegmentHeader probe;
      if (::pread(fd, &probe, sizeof(probe), 0) == static_cast<ssize_t>(sizeof(probe))) {
        uint64_t magic;
        std::memcpy(&magic, probe.magic, sizeof(magic));
        if (magic != 0) break;
      }
    }
    if (absl::Now() > deadline) {
      return absl::FailedPreconditionError(absl::StrCat(
          "kvstore: segment ", name_, " is not initialised (", st.st_size,
          " bytes, no header): its creator died while creating it? remove it and recreate"));
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  SegmentHeader h;
  if (::pread(fd, &h, sizeof(h), 0) != static_cast<ssize_t>(sizeof(h))) {
    return Errno(absl::StrCat("reading the header of ", name_), errno);
  }
  RETURN_IF_ERROR(ValidateHeader(h, static_cast<uint64_t>(st.st_size), &geometry_));
  if (o.geometry.has_value() && !o.geometry->SameShape(geometry_)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kvstore: segment ", name_, " has geometry ", geometry_.block_count, " blocks x ",
        geometry_.block_bytes, " bytes, ", geometry_.max_sequences, " sequences, ",
        geometry_.max_owners, " owners; requested ", o.geometry->block_count, " x ",
        o.geometry->block_bytes, ", ", o.geometry->max_sequences, ", ", o.geometry->max_owners,
        " (remove it or use the same geometry)"));
  }
  RETURN_IF_ERROR(MapSegment(fd, h.segment_bytes, geometry_.huge_pages));
  header_ = reinterpret_cast<SegmentHeader*>(base_);
  if (LoadMagic(header_) == 0 || std::memcmp(header_, &h, sizeof(h)) != 0) {
    return absl::DataLossError(
        absl::StrCat("kvstore: header of ", name_, " changed while attaching"));
  }
  state_ = reinterpret_cast<SharedState*>(base_ + h.state_offset);
  owners_ = reinterpret_cast<OwnerRecord*>(base_ + h.owners_offset);
  seqs_ = reinterpret_cast<SequenceRecord*>(base_ + h.sequences_offset);
  meta_ = reinterpret_cast<BlockMeta*>(base_ + h.blocks_offset);
  data_ = base_ + h.data_offset;
  if (o.register_owner && o.reclaim_on_attach) {
    ASSIGN_OR_RETURN(attach_reclaim_, ReclaimDead());
    if (attach_reclaim_.blocks > 0 || attach_reclaim_.owners > 0) {
      SPC_LOG(INFO) << "kvstore: reclaimed from dead owners" << Kv("segment", name_)
                    << Kv("owners", attach_reclaim_.owners)
                    << Kv("sequences", attach_reclaim_.sequences)
                    << Kv("blocks", attach_reclaim_.blocks);
    }
  }
  return absl::OkStatus();
}

absl::Status KvStore::RegisterOwner(const std::string& label) {
  ASSIGN_OR_RETURN(Lock lock, Acquire());
  const uint64_t ticks = ProcessStartTicks(pid_);
  for (uint32_t i = 0; i < geometry_.max_owners; ++i) {
    OwnerRecord& r = owners_[i];
    if (r.in_use) continue;
    r.pid = pid_;
    r.start_ticks = ticks;
    r.generation = state_->next_generation++;
    r.attach_unix_ns = absl::ToUnixNanos(absl::Now());
    r.heartbeat_unix_ns = r.attach_unix_ns;
    std::memset(r.label, 0, sizeof(r.label));
    std::memcpy(r.label, label.data(), std::min(label.size(), sizeof(r.label) - 1));
    r.in_use = 1;
    owner_slot_ = static_cast<int>(i);
    generation_ = r.generation;
    return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("kvstore: all ", geometry_.max_owners, " owner slots of ", name_, " are taken"));
}

absl::StatusOr<KvStore::Lock> KvStore::Acquire() {
  if (state_ == nullptr) return absl::FailedPreconditionError("kvstore: handle is closed");
  timespec deadline;
  ::clock_gettime(CLOCK_REALTIME, &deadline);
  const int64_t timeout_ns = absl::ToInt64Nanoseconds(lock_timeout_);
  deadline.tv_sec += timeout_ns / 1000000000;
  deadline.tv_nsec += timeout_ns % 1000000000;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec += 1;
    deadline.tv_nsec -= 1000000000;
  }
  int rc = pthread_mutex_timedlock(&state_->mutex, &deadline);
  if (rc == ETIMEDOUT) {
    return absl::DeadlineExceededError(absl::StrCat("kvstore: segment ", name_, " stayed locked for ",
                                                    absl::FormatDuration(lock_timeout_),
                                                    " (its holder is stopped or hung)"));
  }
  if (rc == EOWNERDEAD) {
    // The previous holder died inside a mutation: repair what it may have left half done, then
    // mark the mutex usable again.
    RepairAfterOwnerDeath();
    ++state_->lock_recoveries;
    pthread_mutex_consistent(&state_->mutex);
    SPC_LOG(WARNING) << "kvstore: recovered the segment mutex from a dead holder"
                     << Kv("segment", name_);
    rc = 0;
  }
  if (rc != 0) return Errno(absl::StrCat("locking segment ", name_), rc);
  return Lock(&state_->mutex);
}

absl::Status KvStore::Close() {
  absl::Status status;
  if (base_ != nullptr && owner_slot_ >= 0 && ::getpid() == pid_) {
    auto lock = Acquire();
    if (lock.ok()) {
      if (CheckSelf().ok()) {
        state_->op_in_progress = kOpDetach;
        std::vector<char> drop(geometry_.max_sequences, 0);
        for (uint32_t s = 0; s < geometry_.max_sequences; ++s) {
          const SequenceRecord& r = seqs_[s];
          drop[s] = r.in_use && r.owner_slot == static_cast<uint32_t>(owner_slot_) &&
                    r.owner_generation == generation_;
        }
        DropSequences(drop);
        owners_[owner_slot_].in_use = 0;
        state_->op_in_progress = kOpNone;
      }
    } else {
      status = lock.status();
    }
  }
  owner_slot_ = -1;
  if (base_ != nullptr) ::munmap(base_, mapping_bytes_);
  if (fd_ >= 0) ::close(fd_);
  base_ = nullptr;
  fd_ = -1;
  header_ = nullptr;
  state_ = nullptr;
  return status;
}

KvStore::~KvStore() {
  absl::Status st = Close();
  if (!st.ok()) {
    SPC_LOG(WARNING) << "kvstore: close failed" << Kv("error", st.ToString());
  }
}

}  // namespace specontext::kvstore
