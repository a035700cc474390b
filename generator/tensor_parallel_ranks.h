// The engines of tensor-parallel ranks 1..N-1 behind the generator's engine loop (docs/services.md,
// "Tensor parallelism"). Rank 0's engine is the loop's own; each other rank's engine runs on a long-lived
// thread of its own, and one step of the group is one Engine::Step() on every rank at once.
//
// Lockstep: an Engine's scheduling (cancellations, admission, chunking, sampling) is a function of what was
// submitted and cancelled before each Step() and of its options; the clock only fills GenerationStats. So
// ranks that get the same Submit/Cancel calls in the same order between the same steps, with the same
// options (and a KV budget in the rank's own bytes, which are equal on every rank), take the same decisions;
// the in-process all-reduce hands every rank the same logits bits, so they sample the same tokens. The loop
// applies every Submit/Cancel to all ranks between steps, and after each step compares what every rank
// emitted (RankStepRecord): a difference means the group has diverged.
//
// The step fence: after its Step() every rank calls Communicator::Barrier(). A rank that ran fewer
// collectives than another (a failed forward, a different batch) meets the other's all-reduce with its
// barrier, which fails with InvalidArgument on both; a rank whose fence fails aborts the group, so every
// rank still waiting in a collective returns Aborted. No rank waits forever for one that left its step.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/model/engine.h"
#include "core/parallel/communicator.h"

namespace specontext::generator {

/// What one rank did in one step, in the order the engine emitted it; equal on every rank of a healthy group.
struct RankStepRecord {
  struct Event {
    uint64_t id = 0;
    int32_t token = -1;
    bool done = false;
    FinishReason reason = FinishReason::kNone;
    absl::StatusCode code = absl::StatusCode::kOk;  // of a kError final event
    bool operator==(const Event&) const = default;
  };
  std::vector<Event> events;
  absl::StatusCode step_code = absl::StatusCode::kOk;  // Engine::Step()'s
  bool fence_ok = true;                                // the barrier after the step
  int32_t running = 0, queued = 0;                     // after the step
  /// "" when `other` matches this record, else what differs first.
  std::string Diff(const RankStepRecord& other) const;
};

/// Records `ev` of request `id` into `record` (rank 0's events are recorded by the loop with this too).
void RecordEvent(RankStepRecord* record, uint64_t id, const StreamEvent& ev);

class TensorParallelRanks {
 public:
  /// `engines`: ranks 1..N-1 (index = rank - 1); `comms`: every rank's communicator (index = rank). All must
  /// outlive this object. Starts one thread per engine.
  TensorParallelRanks(std::vector<Engine*> engines, std::vector<Communicator*> comms);
  ~TensorParallelRanks();
  TensorParallelRanks(const TensorParallelRanks&) = delete;
  TensorParallelRanks& operator=(const TensorParallelRanks&) = delete;

  /// Ranks in the group, rank 0 included.
  int size() const { return static_cast<int>(comms_.size()); }

  // The calls below are made by the loop thread only, never while a step runs.

  /// Submits `request` to every rank 1..N-1; each rank's events go to its step record. Returns each rank's
  /// Engine::Submit result (index = rank - 1).
  std::vector<absl::StatusOr<uint64_t>> Submit(const GenerationRequest& request);
  void Cancel(uint64_t id);
  /// Starts Step() on every rank 1..N-1 (then the fence); FinishStep() waits for them.
  void StartStep();
  /// The records of ranks 1..N-1 (index = rank - 1) for the step started last.
  std::vector<RankStepRecord> FinishStep();
  /// Rank 0's fence after its Step() (the loop thread's rank): false when it failed (the group is then
  /// aborted).
  bool Fence0();
  /// Aborts the group: collectives pending or later fail on every rank (never undone).
  void Abort();

 private:
  struct Rank;
  void RunRank(Rank* rank);

  std::vector<Communicator*> comms_;
  std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace specontext::generator
