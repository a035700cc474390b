#include "core/eval/distribution.h"

#include <algorithm>
#include <cmath>

namespace specontext {

double Quantile(std::span<const double> values, double q) {
  if (values.empty()) return 0;
  std::vector<double> v(values.begin(), values.end());
  std::sort(v.begin(), v.end());
  const double pos = std::clamp(q, 0.0, 1.0) * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

double Mean(std::span<const double> values) {
  if (values.empty()) return 0;
  double sum = 0;
  for (double x : values) sum += x;
  return sum / static_cast<double>(values.size());
}

std::vector<int64_t> Histogram(std::span<const double> values, double lo, double hi, int32_t bins) {
  std::vector<int64_t> counts(std::max(bins, 1), 0);
  const double width = (hi - lo) / static_cast<double>(counts.size());
  for (double x : values) {
    if (std::isnan(x)) continue;
    const double b = width > 0 ? std::floor((x - lo) / width) : 0;
    counts[static_cast<size_t>(std::clamp(b, 0.0, static_cast<double>(counts.size() - 1)))]++;
  }
  return counts;
}

}  // namespace specontext
