// The harness of `specontext bench --sparse` (bench_sparse_command.cc): R sequences filled by real prefill
// through SparseDecoder (or dense attention over plain KV with `dense`), decode steps timed at their current
// length, and the figures of a measuring point (step time, tiers, elastic loading, copy time, floor) as JSON.
// Method and fields: docs/sparse.md "Benchmarks".
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/sparse_decoder.h"
#include "core/runtime/runtime.h"
#include "nlohmann/json.hpp"

namespace specontext {

using BenchJson = nlohmann::ordered_json;

// Bandwidths the floor divides by: device copy (bytes read + written per second, 1 GiB f32 buffers)
// and device -> pinned host (the PCIe rate elastic loads and host appends run at), best of 5.
struct Bandwidths {
  double hbm = 0, pcie = 0;
};
absl::StatusOr<Bandwidths> MeasureBandwidths(Backend& b, bool pcie);

struct SparseBenchSetup {
  Runtime* rt = nullptr;                // the loaded model (outlives the runs)
  const RetrievalHead* head = nullptr;  // null with `dense`
  SparseOptions options;                // planner limit already reduced by the prefill headroom
  bool dense = false;                   // plain KV and dense attention instead of SparseDecoder
  int64_t steps = 10, warmup = 3, chunk = 4096;  // timed / untimed steps per point, prefill chunk
  Bandwidths bw;
  double synthetic_overlap = 0;
};

// R sequences of one measuring run, through SparseDecoder (sparse) or Transformer (dense).
class SparseBenchRun {
 public:
  SparseBenchRun(const SparseBenchSetup& s, std::mt19937& rng) : s_(s), rng_(rng) {}

  /// Builds the decoder, checks the host can hold the layers the planner offloads at R × capacity tokens, and
  /// allocates the sequences (device KV grows with them; with kv_grow_rows 0 it is allocated for the whole
  /// capacity and those layers are offloaded first). Memory that does not fit (device, planner, pinned host)
  /// is an error status.
  absl::Status Allocate(int64_t requests, int32_t capacity);
  /// Prefills every sequence up to `to` tokens (random ids), one sequence at a time in chunks.
  absl::Status Extend(int32_t to);
  /// Times warmup + steps decode steps at the current length (each adds one token): the point's figures.
  absl::StatusOr<BenchJson> Measure();
  /// Setup costs so far (allocation, fill) and the tiers: where a long run spends its time before a point.
  BenchJson Progress() const;
  /// The sparse decoder's counters so far (zeros in dense mode).
  SparseEngineStats stats() const { return dec_ != nullptr ? dec_->stats() : SparseEngineStats{}; }

 private:
  absl::Status Forward(std::span<const ForwardSeq> fwd, int64_t only, Tensor* logits);
  // A decode step as the engine runs it on a device-sampling backend: logits stay on the device, greedy
  // tokens are picked there and only their ids come down (the step's one wait).
  absl::Status ForwardAndSampleOnDevice(std::span<const ForwardSeq> fwd, std::vector<int32_t>* ids);

  const SparseBenchSetup& s_;
  std::mt19937& rng_;
  std::unique_ptr<SparseDecoder> dec_;
  std::vector<std::unique_ptr<SequenceKv>> kv_;
  int32_t len_ = 0, capacity_ = 0, gpu_layers_at_capacity_ = -1;
  double fill_seconds_ = 0, alloc_seconds_ = 0;
};

}  // namespace specontext
