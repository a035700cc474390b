#include "tools/client/serve_bench_workload.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace specontext::client {

WorkloadRng::WorkloadRng(uint64_t seed, uint64_t stream) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
  engine_.seed(seq);
}

double WorkloadRng::Uniform01() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

int64_t WorkloadRng::Between(int64_t lo, int64_t hi) {
  const uint64_t n = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) + 1;
  if (n == 0) return static_cast<int64_t>(engine_());  // the full 64-bit range
  unsigned __int128 m = static_cast<unsigned __int128>(engine_()) * n;
  if (static_cast<uint64_t>(m) < n) {
    const uint64_t threshold = (0 - n) % n;
    while (static_cast<uint64_t>(m) < threshold) m = static_cast<unsigned __int128>(engine_()) * n;
  }
  return static_cast<int64_t>(static_cast<uint64_t>(lo) + static_cast<uint64_t>(m >> 64));
}

double WorkloadRng::Normal() {
  const double u1 = 1.0 - Uniform01();  // (0, 1]: log stays finite
  const double u2 = Uniform01();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

double WorkloadRng::Exponential(double mean) { return -mean * std::log(1.0 - Uniform01()); }

int64_t LengthDist::Sample(WorkloadRng& rng) const {
  switch (kind) {
    case Kind::kFixed:
      return static_cast<int64_t>(a);
    case Kind::kUniform:
      return rng.Between(static_cast<int64_t>(a), static_cast<int64_t>(b));
    case Kind::kNormal: {
      const double v = std::round(a + b * rng.Normal());
      return v < 1 ? 1 : static_cast<int64_t>(std::min(v, 1e15));
    }
  }
  return 1;
}

std::string LengthDist::ToString() const {
  switch (kind) {
    case Kind::kFixed:
      return absl::StrCat(static_cast<int64_t>(a));
    case Kind::kUniform:
      return absl::StrCat("uniform:", static_cast<int64_t>(a), ":", static_cast<int64_t>(b));
    case Kind::kNormal:
      return absl::StrCat("normal:", a, ":", b);
  }
  return "";
}

namespace {

constexpr int64_t kMaxLength = int64_t{1} << 30;

absl::Status LengthError(absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("expects N, uniform:A:B or normal:MEAN:STD, got \"", text, "\" (", why, ")"));
}

}  // namespace

absl::StatusOr<LengthDist> ParseLengthDist(absl::string_view text) {
  const std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  LengthDist d;
  if (parts.size() == 1) {
    int64_t n;
    if (!absl::SimpleAtoi(parts[0], &n)) return LengthError(text, "not an integer");
    if (n < 1 || n > kMaxLength) return LengthError(text, "N must be in [1, 2^30]");
    d.a = static_cast<double>(n);
    return d;
  }
  if (parts.size() != 3) return LengthError(text, "wrong number of fields");
  const std::string kind = absl::AsciiStrToLower(parts[0]);
  if (kind == "uniform") {
    int64_t lo, hi;
    if (!absl::SimpleAtoi(parts[1], &lo) || !absl::SimpleAtoi(parts[2], &hi)) {
      return LengthError(text, "A and B must be integers");
    }
    if (lo < 1 || hi < lo || hi > kMaxLength) return LengthError(text, "needs 1 <= A <= B <= 2^30");
    d.kind = LengthDist::Kind::kUniform;
    d.a = static_cast<double>(lo);
    d.b = static_cast<double>(hi);
    return d;
  }
  if (kind == "normal") {
    double mean, std;
    if (!absl::SimpleAtod(parts[1], &mean) || !absl::SimpleAtod(parts[2], &std) ||
        !std::isfinite(mean) || !std::isfinite(std)) {
      return LengthError(text, "MEAN and STD must be finite numbers");
    }
    if (mean < 1 || mean > kMaxLength || std < 0) {
      return LengthError(text, "needs 1 <= MEAN <= 2^30 and STD >= 0");
    }
    d.kind = LengthDist::Kind::kNormal;
    d.a = mean;
    d.b = std;
    return d;
  }
  return LengthError(text, "unknown distribution");
}

absl::StatusOr<double> ParseRequestRate(absl::string_view text) {
  if (absl::AsciiStrToLower(text) == "inf") return std::numeric_limits<double>::infinity();
  double rate;
  if (!absl::SimpleAtod(text, &rate) || !std::isfinite(rate) || rate <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expects a positive number of requests/s or inf, got \"", text, "\""));
  }
  return rate;
}

std::vector<double> PoissonArrivals(int64_t n, double rate, WorkloadRng& rng) {
  std::vector<double> at(static_cast<size_t>(std::max<int64_t>(n, 0)), 0.0);
  if (std::isinf(rate)) return at;
  double t = 0;
  for (size_t i = 0; i < at.size(); ++i) {
    at[i] = t;
    t += rng.Exponential(1.0 / rate);
  }
  return at;
}

absl::StatusOr<Workload> PlanWorkload(const WorkloadOptions& o) {
  std::vector<int32_t> excluded;  // sorted, unique, inside [0, vocab_size)
  for (int32_t id : o.excluded_ids) {
    if (id >= 0 && id < o.vocab_size) excluded.push_back(id);
  }
  std::sort(excluded.begin(), excluded.end());
  excluded.erase(std::unique(excluded.begin(), excluded.end()), excluded.end());
  const int64_t drawable = int64_t{o.vocab_size} - static_cast<int64_t>(excluded.size());
  if (o.token_prompts && drawable < 1) {
    return absl::InvalidArgumentError(absl::StrCat("no token id to draw prompts from (vocabulary ",
                                                   o.vocab_size, ", ", excluded.size(),
                                                   " excluded)"));
  }
  // Lengths and ids from separate streams: the lengths do not depend on the vocabulary or on which
  // ids are excluded, so one seed gives the same lengths against every model.
  WorkloadRng lengths(o.seed, 2 * o.stream), ids(o.seed, 2 * o.stream + 1);
  Workload w;
  w.requests.resize(static_cast<size_t>(std::max<int64_t>(o.n_requests, 0)));
  for (PlannedRequest& r : w.requests) {
    r.prompt_tokens = o.token_prompts ? o.prompt.Sample(lengths) : 0;
    r.output_tokens = o.output.Sample(lengths);
    if (o.max_context > 1) {
      bool cut = false;
      if (r.prompt_tokens > o.max_context - 1) {
        r.prompt_tokens = o.max_context - 1;
        cut = true;
      }
      if (r.prompt_tokens + r.output_tokens > o.max_context) {
        r.output_tokens = o.max_context - std::max<int64_t>(r.prompt_tokens, 1);
        cut = true;
      }
      w.clamped += cut;
    }
    r.token_ids.resize(static_cast<size_t>(r.prompt_tokens));
    for (int32_t& id : r.token_ids) {
      // The k-th drawable id: step over the excluded ones below it (ascending).
      int64_t v = ids.Between(0, drawable - 1);
      for (int32_t e : excluded) {
        if (v >= e) ++v;
      }
      id = static_cast<int32_t>(v);
    }
  }
  return w;
}

}  // namespace specontext::client
