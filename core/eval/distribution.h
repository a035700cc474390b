// Summaries of a sample of values for the evaluation reports: mean, percentiles and a fixed-bin histogram.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace specontext {

/// The q-quantile (q in [0, 1]) of `values` by linear interpolation between order statistics (numpy's
/// default); `values` need not be sorted. 0 for an empty sample.
double Quantile(std::span<const double> values, double q);
double Mean(std::span<const double> values);

/// Counts of `values` in `bins` equal bins over [lo, hi]; values outside are clamped into the end bins
/// (so a ratio of exactly 1 lands in the last bin).
std::vector<int64_t> Histogram(std::span<const double> values, double lo, double hi, int32_t bins);

}  // namespace specontext
