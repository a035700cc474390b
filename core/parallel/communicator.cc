#include "core/parallel/communicator.h"

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// The state the ranks of one in-process group share. One collective at a time is gathered
// (arrived < size), then distributed (done: every rank copies `sum` out); the next generation begins
// when the last rank has left.
class Group {
 public:
  Group(int size, const InProcessOptions& options) : size_(size), timeout_(options.timeout), posted_(size) {}

  // One collective of rank `rank`; `t` is null for a barrier.
  absl::Status Collective(int rank, Tensor* t) {
    std::unique_lock<std::mutex> lock(mu_);
    // Wait until the previous collective has been copied out by every rank.
    absl::Status s = Wait(lock, [this] { return aborted_ || !done_; });
    if (!s.ok()) return s;
    posted_[rank] = t;
    if (++arrived_ == size_) {
      result_ = Reduce();
      done_ = true;
      cv_.notify_all();
    } else {
      s = Wait(lock, [this] { return aborted_ || done_; });
      // A result that is ready is delivered even when a rank has aborted since (e.g. one that finished and
      // aborted on its way out after this, its last collective).
      if (!s.ok() && !(done_ && absl::IsAborted(s))) return s;
    }
    const absl::Status result = result_;
    lock.unlock();
    // `sum_` stays put until every rank has departed: copy outside the lock.
    if (result.ok() && t != nullptr) {
      if (t->dtype() == DType::kF32) {
        std::memcpy(t->data(), sum_.data(), sum_.size() * sizeof(float));
      } else {
        ConvertFromF32(sum_.data(), t->dtype(), t->data(), sum_.size());
      }
    }
    lock.lock();
    if (++departed_ == size_) {
      done_ = false;
      arrived_ = departed_ = 0;
      ++generation_;
      for (Tensor*& p : posted_) p = nullptr;
      cv_.notify_all();
    }
    return result;
  }

  void Abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  // Waits (mu_ held) until pred() holds: DeadlineExceeded (and the group aborted) past the timeout, Aborted
  // when the group is aborted.
  template <typename Pred>
  absl::Status Wait(std::unique_lock<std::mutex>& lock, Pred pred) {
    if (timeout_ == absl::InfiniteDuration()) {
      cv_.wait(lock, pred);
    } else if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout_), pred)) {
      aborted_ = true;
      cv_.notify_all();
      return absl::DeadlineExceededError(absl::StrCat("collective ", generation_,
                                                      ": the other ranks did not arrive within ",
                                                      absl::FormatDuration(timeout_), "; group aborted"));
    }
    if (aborted_) return absl::AbortedError(absl::StrCat("collective ", generation_, ": the group was aborted"));
    return absl::OkStatus();
  }

  // Checks the posted tensors agree and sums them in rank order into sum_ (f32).
  absl::Status Reduce() {
    const Tensor* first = posted_[0];
    for (int r = 0; r < size_; ++r) {
      const Tensor* t = posted_[r];
      if ((t == nullptr) != (first == nullptr)) {
        return absl::InvalidArgumentError(absl::StrCat("collective ", generation_,
                                                       ": ranks disagree on the call (all-reduce vs barrier)"));
      }
      if (t == nullptr) continue;
      if (t->dtype() != DType::kF32 && t->dtype() != DType::kBF16) {
        return absl::InvalidArgumentError(absl::StrCat("all-reduce: rank ", r, " passed ", t->DebugString(),
                                                       "; f32 or bf16 expected"));
      }
      if (t->device() != DeviceKind::kCpu) {
        return absl::InvalidArgumentError(absl::StrCat("all-reduce: rank ", r, " passed a device tensor ",
                                                       t->DebugString(), "; the in-process group needs host memory"));
      }
      if (t->dtype() != first->dtype() || t->shape() != first->shape()) {
        return absl::InvalidArgumentError(absl::StrCat("all-reduce: rank ", r, " passed ", t->DebugString(),
                                                       ", rank 0 ", first->DebugString()));
      }
    }
    if (first == nullptr) return absl::OkStatus();
    const size_t n = static_cast<size_t>(first->numel());
    sum_.resize(n);
    if (first->dtype() == DType::kF32) {
      std::memcpy(sum_.data(), first->data(), n * sizeof(float));
      for (int r = 1; r < size_; ++r) {
        const float* x = posted_[r]->as<float>();
        for (size_t i = 0; i < n; ++i) sum_[i] += x[i];
      }
    } else {
      for (int r = 0; r < size_; ++r) {
        const uint16_t* x = posted_[r]->as<uint16_t>();
        for (size_t i = 0; i < n; ++i) sum_[i] = r == 0 ? Bf16ToF32(x[i]) : sum_[i] + Bf16ToF32(x[i]);
      }
    }
    return absl::OkStatus();
  }

  // std::mutex rather than absl::Mutex: sanitizers see its synchronisation with an uninstrumented Abseil.
  const int size_;
  const absl::Duration timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  // Guarded by mu_:
  uint64_t generation_ = 0;
  int arrived_ = 0;
  int departed_ = 0;
  bool done_ = false;
  bool aborted_ = false;
  std::vector<Tensor*> posted_;  // [size], this generation's tensors
  absl::Status result_;
  std::vector<float> sum_;  // written by the last arriving rank, read by all until they depart
};

class InProcessCommunicator : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank, int size)
      : group_(std::move(group)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status AllReduceSum(Tensor* inout) override {
    if (inout == nullptr) return absl::InvalidArgumentError("all-reduce: null tensor");
    return group_->Collective(rank_, inout);
  }
  absl::Status Barrier() override { return group_->Collective(rank_, nullptr); }
  void Abort() override { group_->Abort(); }

 private:
  std::shared_ptr<Group> group_;
  const int rank_, size_;
};

// A rank of the host-staged group: the in-process rank above behind a download and an upload.
class HostStagedCommunicator : public Communicator {
 public:
  HostStagedCommunicator(std::unique_ptr<Communicator> inner, Backend* backend)
      : inner_(std::move(inner)), backend_(backend) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }

  absl::Status AllReduceSum(Tensor* inout) override {
    if (inout == nullptr) return absl::InvalidArgumentError("all-reduce: null tensor");
    if (inout->device() == DeviceKind::kCpu) return inner_->AllReduceSum(inout);
    // Another dtype passes through as it is: the group's check refuses it on every rank alike.
    const size_t bytes = inout->nbytes();
    if (staging_.size() < bytes) staging_.resize(bytes);
    Tensor host(staging_.data(), inout->dtype(), inout->shape());
    if (absl::Status s = backend_->ToHost(*inout, &host); !s.ok()) return Fail(s, "download");
    RETURN_IF_ERROR(inner_->AllReduceSum(&host));
    if (absl::Status s = backend_->CopyToDevice(host, inout); !s.ok()) return Fail(s, "upload");
    // A pageable upload has left `staging_` once CopyToDevice returns, so the buffer may be reused.
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    if (absl::Status s = backend_->Synchronize(); !s.ok()) return Fail(s, "barrier");
    return inner_->Barrier();
  }
  void Abort() override { inner_->Abort(); }

 private:
  absl::Status Fail(const absl::Status& s, const char* what) {
    inner_->Abort();
    return absl::Status(s.code(), absl::StrCat("host-staged all-reduce, rank ", inner_->rank(), " ", what, ": ",
                                               s.message()));
  }

  std::unique_ptr<Communicator> inner_;
  Backend* backend_;
  std::vector<char> staging_;  // the rank's tensor on the host, grown to the largest all-reduce
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> CreateHostStagedGroup(std::span<Backend* const> backends,
                                                                 const InProcessOptions& options) {
  std::vector<std::unique_ptr<Communicator>> inner = CreateInProcessGroup(static_cast<int>(backends.size()), options);
  std::vector<std::unique_ptr<Communicator>> out;
  for (size_t r = 0; r < inner.size(); ++r) {
    out.push_back(std::make_unique<HostStagedCommunicator>(std::move(inner[r]), backends[r]));
  }
  return out;
}

std::vector<std::unique_ptr<Communicator>> CreateInProcessGroup(int size, const InProcessOptions& options) {
  std::vector<std::unique_ptr<Communicator>> out;
  if (size < 1) return out;
  auto group = std::make_shared<Group>(size, options);
  for (int r = 0; r < size; ++r) out.push_back(std::make_unique<InProcessCommunicator>(group, r, size));
  return out;
}

}  // namespace specontext
