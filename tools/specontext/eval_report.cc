#include "tools/specontext/eval_report.h"

#include <cstdint>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/eval/distribution.h"

namespace specontext {
namespace {

using json = nlohmann::ordered_json;

// Overlap quantiles reported (the elastic-loading speed figures assume a median near 0.85).
constexpr double kQuantiles[] = {0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95};
constexpr int32_t kHistogramBins = 20;

}  // namespace

void EvalSummary::Add(const EvalTask& task, const EvalSetting& setting, std::span<const double> values) {
  const int s = setting.dense ? 0 : 1;
  const int32_t b = setting.dense ? 0 : setting.budget;
  // Numeric length labels sort by value (1024 before 4096 before 16384), others after them by text.
  int64_t length_value = INT64_MAX;
  if (!absl::SimpleAtoi(task.length, &length_value)) length_value = INT64_MAX;
  for (const Key& key : {Key{s, b, 0, "*", INT64_MIN, "*"}, Key{s, b, 1, task.category, length_value, task.length}}) {
    auto& g = groups_[key];
    g.resize(metrics_.size());
    for (size_t m = 0; m < metrics_.size() && m < values.size(); ++m) g[m].push_back(values[m]);
  }
}

std::vector<json> EvalSummary::Json(const std::string& type) const {
  std::vector<json> out;
  for (const auto& [key, values] : groups_) {
    const auto& [s, budget, detail, category, length_value, length] = key;
    json j = {{"type", type},
              {"category", category},
              {"length", length},
              {"setting", s == 0 ? "dense" : "sparse"},
              {"budget", s == 0 ? json(nullptr) : json(budget)},
              {"n", values.empty() ? 0 : values[0].size()}};
    for (size_t m = 0; m < metrics_.size(); ++m) {
      j[metrics_[m].name + "_mean"] = Mean(values[m]);
      if (metrics_[m].median) j[metrics_[m].name + "_median"] = Quantile(values[m], 0.5);
    }
    out.push_back(std::move(j));
  }
  return out;
}

std::string EvalSummary::Table() const {
  std::string out = absl::StrFormat("%-24s %-8s %-8s %6s %5s", "category", "length", "setting", "budget", "n");
  for (const Metric& m : metrics_) {
    out += absl::StrFormat(" %14s", m.name);
    if (m.median) out += absl::StrFormat(" %14s", m.name + "~");
  }
  out += "\n";
  for (const auto& [key, values] : groups_) {
    const auto& [s, budget, detail, category, length_value, length] = key;
    out += absl::StrFormat("%-24s %-8s %-8s %6s %5d", category.empty() ? "-" : category, length.empty() ? "-" : length,
                           s == 0 ? "dense" : "sparse", s == 0 ? std::string("-") : absl::StrCat(budget),
                           values.empty() ? 0 : static_cast<int>(values[0].size()));
    for (size_t m = 0; m < metrics_.size(); ++m) {
      out += absl::StrFormat(" %14.4f", Mean(values[m]));
      if (metrics_[m].median) out += absl::StrFormat(" %14.4f", Quantile(values[m], 0.5));
    }
    out += "\n";
  }
  return out;
}

json OverlapJson(const EvalSetting& setting, std::span<const double> samples) {
  // No samples (every past fit the budget, so nothing was selected): null figures rather than zeros.
  const bool any = !samples.empty();
  json j = {{"type", "overlap"},
            {"setting", std::string(setting.name())},
            {"budget", setting.dense ? json(nullptr) : json(setting.budget)},
            {"samples", samples.size()},
            {"mean", any ? json(Mean(samples)) : json(nullptr)}};
  for (double q : kQuantiles) {
    j[absl::StrCat("p", static_cast<int>(q * 100 + 0.5))] = any ? json(Quantile(samples, q)) : json(nullptr);
  }
  j["histogram"] = {{"lo", 0.0}, {"hi", 1.0}, {"counts", Histogram(samples, 0.0, 1.0, kHistogramBins)}};
  return j;
}

std::string OverlapLine(const EvalSetting& setting, std::span<const double> samples) {
  if (samples.empty()) {
    return absl::StrFormat("overlap budget=%d: no samples (no step had to select: every past fit the budget)",
                           setting.budget);
  }
  std::string line = absl::StrFormat("overlap budget=%d samples=%d mean=%.4f", setting.budget,
                                     static_cast<int>(samples.size()), Mean(samples));
  for (double q : kQuantiles) {
    line += absl::StrFormat(" p%d=%.4f", static_cast<int>(q * 100 + 0.5), Quantile(samples, q));
  }
  return line;
}

std::string DumpJson(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace specontext
