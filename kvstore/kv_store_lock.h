// Internal: the RAII holder of a segment's robust mutex (see KvStore::Acquire).
#pragma once

#include <pthread.h>

#include <utility>

#include "kvstore/kv_store.h"

namespace specontext::kvstore {

class KvStore::Lock {
 public:
  explicit Lock(pthread_mutex_t* m) : m_(m) {}
  Lock(Lock&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
  Lock& operator=(Lock&&) = delete;
  Lock(const Lock&) = delete;
  ~Lock() {
    if (m_ != nullptr) pthread_mutex_unlock(m_);
  }

 private:
  pthread_mutex_t* m_;
};

/// Initialises a robust, process-shared, error-checking mutex in shared memory.
absl::Status InitSharedMutex(pthread_mutex_t* m);

}  // namespace specontext::kvstore
