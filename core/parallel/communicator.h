// Collectives between the ranks of a tensor-parallel group (docs/tensor-parallel.md).
//
// A rank is one thread of this process driving its own Backend and model shard. The in-process
// group below serves the CPU backend (ranks share host memory); NcclCommunicator (core/cuda) serves
// CUDA backends, one GPU per rank; the host-staged group serves device backends whose ranks share one
// device (the one-GPU test mode: every all-reduce goes through host memory).
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/backend.h"
#include "core/tensor.h"

namespace specontext {

/// One rank's end of a communication group. Every rank of the group must call the same collectives
/// in the same order (each call is matched with the other ranks' call of the same ordinal). A
/// communicator is used by one thread at a time (its rank's thread).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Sums `inout` over the ranks, in place: every rank passes a tensor of the same shape and dtype
  /// (f32 or bf16) on its backend's device and receives the sum. InvalidArgument on every rank when
  /// the ranks' shapes or dtypes differ (no tensor is changed); Aborted when the group was aborted.
  virtual absl::Status AllReduceSum(Tensor* inout) = 0;
  /// Returns once every rank has called Barrier (Aborted when the group was aborted).
  virtual absl::Status Barrier() = 0;
  /// Marks the group failed: every collective pending or later, on any rank, returns Aborted instead
  /// of waiting for this rank. A rank that fails between collectives calls it before it leaves.
  virtual void Abort() = 0;
};

struct InProcessOptions {
  /// How long a rank waits for the others in one collective before it aborts the group
  /// (DeadlineExceeded on the rank that timed out, Aborted on the others).
  absl::Duration timeout = absl::InfiniteDuration();
};

/// A group of `size` ranks in this process sharing host memory: returns one communicator per rank
/// (index = rank), each to be driven by its own thread; the group lives while any of them does.
/// Tensors must be host-readable (DeviceKind::kCpu).
///
/// AllReduceSum is deterministic: the last rank to arrive adds the ranks' tensors in rank order
/// 0, 1, ..., size - 1 in f32 (bf16 inputs rounded once at the end) and every rank copies out the same
/// bits. Calls are numbered by a generation counter: a call's result stays in place until every rank has
/// copied it out, so a fast rank entering the next collective waits for the slowest one to leave the
/// previous. Abort() (any rank) or a timeout sets the group's abort flag: waiters whose collective is still
/// incomplete wake and return Aborted (one already complete still delivers its result), and every later
/// collective returns Aborted at once; the flag is never cleared. So a rank that is done may Abort() on its
/// way out: ranks still expecting a collective from it fail instead of waiting forever.
std::vector<std::unique_ptr<Communicator>> CreateInProcessGroup(int size, const InProcessOptions& options = {});

/// A group of `backends.size()` ranks whose tensors live on a device (CUDA backends that share one GPU, the
/// `--tensor-parallel-devices shared` test mode of docs/tensor-parallel.md): rank r's AllReduceSum downloads
/// its tensor with `backends[r]->ToHost` (which waits for the rank's stream), takes the in-process group's sum
/// above (rank order, f32, the same bits on every rank) and uploads it back with `CopyToDevice` (enqueued on
/// the rank's stream). Host tensors skip the staging. Barrier also waits for the rank's backend. A rank whose
/// download or upload fails aborts the group (the others return Aborted instead of waiting). Every rank's
/// thread must make its backend current (Backend::MakeCurrent). The backends must outlive the communicators.
/// Each collective costs two copies over PCIe and a host synchronisation of every rank: a test mode, not a
/// way to serve.
std::vector<std::unique_ptr<Communicator>> CreateHostStagedGroup(std::span<Backend* const> backends,
                                                                 const InProcessOptions& options = {});

}  // namespace specontext
