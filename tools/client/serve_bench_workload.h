// The workload of the serving benchmark (specontext-loadgen): prompt and output lengths drawn from
// a distribution, random token-id prompts and Poisson arrival times, all derived from one seed.
//
// Every draw goes through WorkloadRng: std::mt19937_64 (its output is fixed by the C++ standard)
// with our own transforms to uniform, normal and exponential values (the std:: distributions differ
// between standard libraries), so a seed names the same workload on every platform. Lengths, prompt
// ids and arrival gaps come from separate streams of the seed: the same seed gives the same prompts
// whatever the request rate, so runs at several rates or concurrencies serve the same requests.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace specontext::client {

/// Seeded random source of the workload. `stream` separates independent sequences of one seed.
class WorkloadRng {
 public:
  WorkloadRng(uint64_t seed, uint64_t stream);
  /// Uniform in [0, 1) with 53 random bits.
  double Uniform01();
  /// Uniform integer in [lo, hi] (lo <= hi), unbiased (Lemire's bounded draw).
  int64_t Between(int64_t lo, int64_t hi);
  /// Standard normal (Box-Muller).
  double Normal();
  /// Exponential with mean `mean` (> 0).
  double Exponential(double mean);

 private:
  std::mt19937_64 engine_;
};

/// A token-length distribution as the flags write it:
///   "N"               always N (N >= 1)
///   "uniform:A:B"     integers uniform in [A, B] (1 <= A <= B)
///   "normal:MEAN:STD" normal, rounded to an integer and clamped to >= 1 (MEAN >= 1, STD >= 0)
struct LengthDist {
  enum class Kind { kFixed, kUniform, kNormal };
  Kind kind = Kind::kFixed;
  double a = 1;  // fixed: the value; uniform: A; normal: MEAN
  double b = 0;  // uniform: B; normal: STD

  /// A draw, always >= 1.
  int64_t Sample(WorkloadRng& rng) const;
  /// The flag's text back ("uniform:8:32").
  std::string ToString() const;
};

/// Parses a LengthDist; InvalidArgument saying what was expected (the caller names the flag).
absl::StatusOr<LengthDist> ParseLengthDist(absl::string_view text);

/// Parses a request rate in requests/s: a positive finite number, or "inf" (all at once:
/// +infinity).
absl::StatusOr<double> ParseRequestRate(absl::string_view text);

/// Send offsets in seconds from the start of a run for `n` requests arriving as a Poisson process
/// of `rate` requests/s: the first at 0, then exponential gaps of mean 1/rate (as vLLM's
/// benchmark_serving sends them). Non-decreasing; all zero when rate is +inf.
std::vector<double> PoissonArrivals(int64_t n, double rate, WorkloadRng& rng);

/// One request of the plan: the lengths asked of the server (already cut to its context).
struct PlannedRequest {
  int64_t prompt_tokens = 0;       // asked prompt length (0 in text-prompt mode: the server counts)
  int64_t output_tokens = 0;       // max_new_tokens, generated in full with ignore_eos
  std::vector<int32_t> token_ids;  // the prompt (empty in text-prompt mode)
};

struct WorkloadOptions {
  int64_t n_requests = 0;
  LengthDist prompt;  // unused in text-prompt mode
  LengthDist output;
  bool token_prompts = true;          // false: the prompt is a fixed text (--prompt)
  int32_t vocab_size = 0;             // ids are drawn from [0, vocab_size)
  std::vector<int32_t> excluded_ids;  // never drawn (the model's end-of-sequence ids)
  int64_t max_context = 0;            // prompt + output must fit; 0 = no bound
  uint64_t seed = 0;
  uint64_t stream = 0;  // 0 for the measured requests, 1 for the warmup ones
};

struct Workload {
  std::vector<PlannedRequest> requests;
  int64_t clamped = 0;  // requests whose drawn lengths were cut to fit max_context
};

/// Draws `n_requests` requests. Lengths that do not fit max_context are cut (the prompt to
/// max_context - 1, then the output to what remains) and counted in `clamped`. InvalidArgument when
/// token prompts are asked without a vocabulary or every id is excluded.
absl::StatusOr<Workload> PlanWorkload(const WorkloadOptions& options);

}  // namespace specontext::client
