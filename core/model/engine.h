// Continuous-batching generation over one Transformer: requests join and leave between steps;
// each step runs one ragged forward mixing prompt chunks and decode tokens.
//
// Threading: Submit() and Cancel() may be called from any thread; Step() and Generate() from one
// engine thread. Callbacks run on the engine thread.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/model/sampler.h"
#include "core/model/sparse_hooks.h"
#include "core/model/transformer.h"

namespace specontext {

class Tokenizer;
class StreamDecoder;

struct GenerationRequest {
  std::vector<int32_t> prompt;             // token ids, non-empty
  SamplingParams sampling;
  int32_t max_new_tokens = 128;            // clamped to the model's context
  std::vector<int32_t> stop_token_ids;     // in addition to the model's EOS ids
  std::vector<std::string> stop_strings;   // need a tokenizer; the stop string is not emitted
  bool ignore_eos = false;
  // Sparse mode only (EngineOptions::sparse set): past tokens attended per KV head; 0 = the engine's
  // default (--budget). Must not exceed the model's context.
  int32_t budget = 0;
  // Sparse mode only: attend to every past token (budget = the sequence's capacity; exact dense attention).
  bool dense = false;
  // Teacher forcing (evaluation): the tokens emitted after the prompt, in order, instead of sampled ones.
  // Each is a decode step of its own, exactly as in generation. EOS and stop tokens do not end a forced
  // request; max_new_tokens is clamped to their count. Empty = sample.
  std::vector<int32_t> forced_tokens;
  // Called on the engine thread with the f32 logits [vocab] from which the request's next token is chosen
  // (index = tokens generated before it), before the choice. Set, it makes the step download the logits
  // (no device-side sampling for the step).
  std::function<void(int32_t index, std::span<const float> logits)> logits_observer;
  // Who sent the request (the services: the peer's address or TLS identity). Admission takes queued
  // requests round-robin by client, so one client's many requests cannot starve another's. Empty is a
  // client like any other.
  std::string client;
};

enum class FinishReason : uint8_t { kNone, kStopToken, kStopString, kLength, kCancelled, kError };
std::string_view FinishReasonName(FinishReason reason);

struct GenerationStats {
  int32_t prompt_tokens = 0;
  int32_t generated_tokens = 0;
  double time_to_first_token_ms = 0;  // from admission to the first sampled token
  double decode_ms = 0;               // from the first to the last token
};

struct StreamEvent {
  int32_t token = -1;          // the sampled token (-1 on a final event without a token)
  std::string text;            // newly complete text (UTF-8), possibly empty
  bool done = false;
  FinishReason reason = FinishReason::kNone;
  absl::Status status;         // set when reason is kError
  GenerationStats stats;       // filled on the final event
};
using StreamCallback = std::function<void(const StreamEvent&)>;

struct GenerationResult {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason reason = FinishReason::kNone;
  GenerationStats stats;
};

struct EngineOptions {
  int32_t max_batch = 32;            // sequences decoding at once
  int32_t max_tokens_per_step = 512; // prompt-chunk budget of one step
  int32_t max_queue = 1024;          // Submit fails with ResourceExhausted past this
  // Dense mode: KV bytes the running requests may reserve together; each reserves its whole capacity
  // (prompt + max_new_tokens) x Transformer::KvBytesPerToken() at admission. A request whose own
  // reservation is larger is refused by Submit (ResourceExhausted); one that does not fit beside the
  // running ones waits in the queue. 0 = no bound. Sparse mode plans its own memory (SparseDecodeHooks).
  int64_t max_kv_bytes = 0;
  // Batch slots one client (GenerationRequest::client) may hold at once; its other requests wait while other
  // clients' are admitted, so max_batch - this slots stay open to them. 0 = no bound (a lone client may
  // fill the batch; another then waits for the first slot that frees).
  int32_t max_running_per_client = 0;
  // Longest sequence (prompt + generated) a request may reach; 0 = the model's context. Prompts must leave
  // room under it and max_new_tokens is clamped to it (a sparse decoder built with the same
  // SparseOptions::max_context plans its memory for it).
  int32_t max_context = 0;
  // SpeContext sparse decoding (retrieval head, KV tiers, elastic loading, memory planner); null = dense.
  // Must be built for the same model; shared so the caller can keep a handle (stats, test hooks).
  std::shared_ptr<SparseDecodeHooks> sparse;
  // On a backend with Backend::device_sampling() (CUDA): keep the logits on the device and pick the tokens
  // there, downloading only their ids (dense, and sparse hooks with ForwardDevice). Off: download the logits
  // and sample on the host.
  bool device_sampling = true;
  // Called on the engine thread after each prompt chunk of a request: prompt tokens done, prompt size.
  std::function<void(uint64_t id, int32_t done, int32_t total)> prefill_progress;
};

class Engine {
 public:
  // `tokenizer` may be null (no text, no stop strings). Both must outlive the engine.
  Engine(Transformer* model, const Tokenizer* tokenizer, EngineOptions options);
  ~Engine();

  // Validates and queues a request. Errors: InvalidArgument (bad request), ResourceExhausted (queue full).
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, StreamCallback callback);
  // Finishes a request with kCancelled at the next step; unknown ids are ignored.
  void Cancel(uint64_t id);
  // Admits what fits, runs one forward, samples and streams. A no-op when idle.
  absl::Status Step();
  bool HasWork() const;
  int32_t running() const { return static_cast<int32_t>(running_.size()); }
  int32_t queued() const;
  // Dense KV bytes reserved by running requests (engine thread; see EngineOptions::max_kv_bytes).
  int64_t reserved_kv_bytes() const { return reserved_kv_bytes_; }

  // Runs one request to completion on the calling thread (the CLI's path).
  absl::StatusOr<GenerationResult> Generate(GenerationRequest request, const StreamCallback& callback = {});

  Transformer* model() const { return model_; }
  bool sparse() const { return options_.sparse != nullptr; }
  // Sparse mode counters and planner state (zeros in dense mode). Engine thread.
  SparseEngineStats sparse_stats() const;

 private:
  struct Sequence;
  absl::Status Validate(GenerationRequest& request) const;
  void Admit();
  // The queued request admission takes next: the first queued one of the client admitted least recently
  // (clients with nothing admitted yet first, in queue order), skipping clients at max_running_per_client;
  // queue_.end() when none may be admitted.
  std::deque<std::unique_ptr<Sequence>>::iterator NextToAdmit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Dense KV bytes a request of `capacity` tokens reserves.
  int64_t KvReservation(int32_t capacity) const;
  // Finishes cancelled requests, queued or running, with kCancelled.
  void ApplyCancellations();
  void Emit(Sequence& s, int32_t token);
  void Finish(Sequence& s, FinishReason reason, absl::Status status = absl::OkStatus());
  // Runs the step's forward and picks a token for each of `sample_rows` (rows of `fwd`), on the device
  // when the backend can (dense mode), else from host logits.
  absl::Status ForwardAndSample(std::span<const ForwardSeq> fwd, const std::vector<Sequence*>& included,
                                const std::vector<int32_t>& sample_rows, std::vector<int32_t>* tokens);

  Transformer* model_;
  const Tokenizer* tokenizer_;
  EngineOptions options_;
  std::vector<int32_t> eos_ids_;

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Sequence>> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Per client with requests queued or running: how many, and the admission count at its last admission
  // (0: none yet). Entries go when their last request finishes.
  struct ClientState {
    int32_t live = 0;
    int32_t running = 0;
    uint64_t last_admission = 0;
  };
  absl::flat_hash_map<std::string, ClientState> clients_ ABSL_GUARDED_BY(mu_);
  uint64_t admissions_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserved_kv_bytes_ = 0;  // engine thread only

  std::vector<std::unique_ptr<Sequence>> running_;  // engine thread only
};

}  // namespace specontext
