// Summaries of `specontext eval`: per-result values grouped by (category, length, setting, budget), plus one
// overall row per setting (category and length "*"), written as JSON lines and printed as a table; and the
// distribution of the index sets' step-to-step overlap.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "core/eval/task_eval.h"
#include "nlohmann/json.hpp"

namespace specontext {

class EvalSummary {
 public:
  struct Metric {
    std::string name;
    bool median = false;  // also summarised by its median (else the mean only)
  };
  explicit EvalSummary(std::vector<Metric> metrics) : metrics_(std::move(metrics)) {}

  /// One result's values, parallel to the metrics.
  void Add(const EvalTask& task, const EvalSetting& setting, std::span<const double> values);
  /// One object per group: {"type": type, "category", "length", "setting", "budget", "n", "<m>_mean", ...}.
  std::vector<nlohmann::ordered_json> Json(const std::string& type) const;
  /// A fixed-width table of the same groups.
  std::string Table() const;

 private:
  // (setting, budget, overall-first flag, category, numeric length or INT64_MAX, length label); the overall
  // row sorts first within a setting.
  using Key = std::tuple<int, int32_t, int, std::string, int64_t, std::string>;
  std::vector<Metric> metrics_;
  std::map<Key, std::vector<std::vector<double>>> groups_;  // per group: per metric, the values
};

/// {"type": "overlap", "setting", "budget", "samples", "mean", "p5" ... "p95", "histogram": {...}} for the
/// per-(request, step) overlap samples of one setting.
nlohmann::ordered_json OverlapJson(const EvalSetting& setting, std::span<const double> samples);
/// One line of it for the terminal.
std::string OverlapLine(const EvalSetting& setting, std::span<const double> samples);

/// Serializes without throwing on invalid UTF-8 (replaced): model outputs go through it.
std::string DumpJson(const nlohmann::ordered_json& j);

}  // namespace specontext
