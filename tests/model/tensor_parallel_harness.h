// Dense tensor-parallel runs for tests, on any backend: the CPU tests (tests/model/tensor_parallel_test.cc, the
// in-process group) and the CUDA ones (tests/cuda/cuda_tensor_parallel_test.cc, the host-staged group and NCCL)
// drive the same prefill + greedy decode on one thread per rank and compare it with an unsharded run.
#pragma once

#include <algorithm>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/transformer.h"
#include "tests/common/stories260k_shape.h"
#include "tests/common/tensor_parallel_ranks.h"
#include "tests/model/random_model.h"

namespace specontext::testing {

inline constexpr int kTpDecodeSteps = 16;

inline std::vector<int32_t> TpPrompt(int n, int64_t vocab) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<int32_t>((7 * i * i + 3 * i + 1) % vocab));
  return out;
}

inline int32_t Greedy(const float* logits, int64_t vocab) {
  return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
}

inline ModelConfig Stories260kShape() {
  ModelConfig c = TinyConfig();
  SetStories260kShape(c);
  c.max_position_embeddings = 512;
  return c;
}

// The logits of the prefill's last token and of every decode step ([1 + kTpDecodeSteps][vocab]) and the
// greedy tokens, for one rank.
struct TpTrace {
  std::vector<std::vector<float>> logits;
  std::vector<int32_t> tokens;
};

// Loads the rank's shard on `backend` (whose device the calling thread has made current) and runs an 11-token
// prefill and kTpDecodeSteps greedy steps. With `feed`, decode step k is fed (*feed)[k] instead of the rank's
// own greedy token: bf16 runs feed the reference's tokens so that a near tie cannot fork the two runs.
inline absl::StatusOr<TpTrace> RunTpRank(const Checkpoint& ck, Backend* backend, const TensorParallel& tp,
                                         const std::vector<int32_t>* feed = nullptr) {
  auto model = Transformer::Load(ck, backend, {}, tp);
  if (!model.ok()) return model.status();
  const int64_t vocab = (*model)->config().vocab_size;
  const std::vector<int32_t> prompt = TpPrompt(11, vocab);
  auto kv = (*model)->AllocateKv(static_cast<int32_t>(prompt.size()) + kTpDecodeSteps + 1);
  if (!kv.ok()) return kv.status();
  TpTrace trace;
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  std::vector<int32_t> next = prompt;
  int32_t past = 0;
  for (int step = 0; step <= kTpDecodeSteps; ++step) {
    ForwardSeq s{next, past, kv->get()};
    if (absl::Status st = (*model)->Forward({&s, 1}, false, &logits); !st.ok()) return st;
    past += static_cast<int32_t>(next.size());
    trace.logits.emplace_back(logits.as<float>(), logits.as<float>() + vocab);
    trace.tokens.push_back(Greedy(logits.as<float>(), vocab));
    next = {feed != nullptr ? (*feed)[step] : trace.tokens.back()};
  }
  return trace;
}

// Runs every rank on its own thread: rank r makes backends[r] current, then RunTpRank over comms[r]. A rank
// that fails aborts the group so that the others return instead of waiting.
inline std::vector<absl::StatusOr<TpTrace>> RunTpRanks(const Checkpoint& ck, std::span<Backend* const> backends,
                                                       std::span<const std::unique_ptr<Communicator>> comms,
                                                       const std::vector<int32_t>* feed = nullptr) {
  return RunOnRanks<TpTrace>(backends, comms, [&](Backend* backend, TensorParallel tp) {
    return RunTpRank(ck, backend, tp, feed);
  });
}

}  // namespace specontext::testing
