#include <algorithm>
#include <cmath>
#include <exception>
#include <set>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "core/metrics/metrics.h"
#include "prometheus/check_names.h"
#include "prometheus/text_serializer.h"

namespace specontext::metrics {

template <typename T>
absl::StatusOr<T*> Family<T>::WithLabels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: ", name(), " has ", label_names_.size(), " labels (",
                     absl::StrJoin(label_names_, ","), "), got ", values.size(), " values"));
  }
  prometheus::Labels labels;
  for (size_t i = 0; i < values.size(); ++i) labels.emplace(label_names_[i], values[i]);
  // prometheus-cpp reports errors by exceptions; none may cross this boundary.
  try {
    if constexpr (std::is_same_v<T, Histogram>) {
      return &family_->Add(labels, bounds_);
    } else {
      return &family_->Add(labels);
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: ", name(), ": ", e.what()));
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

Registry::Registry()
    : registry_(
          std::make_unique<prometheus::Registry>(prometheus::Registry::InsertBehavior::Throw)) {}

Registry::~Registry() = default;

template <typename T, typename Builder>
absl::StatusOr<Family<T>*> Registry::Add(Builder builder, const std::string& name,
                                         const std::string& help,
                                         const std::vector<std::string>& labels,
                                         std::vector<double> bounds,
                                         std::vector<std::unique_ptr<Family<T>>>* owned) {
  // prometheus-cpp checks label names only when a child is added; check them all up front.
  if (!prometheus::CheckMetricName(name)) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: invalid metric name '", name, "'"));
  }
  std::set<std::string> seen;
  for (const std::string& l : labels) {
    if (!prometheus::CheckLabelName(l)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: invalid label name '", l, "' in ", name));
    }
    if (!seen.insert(l).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: label '", l, "' repeated in ", name));
    }
  }
  absl::MutexLock lock(&mu_);
  prometheus::Family<T>* family = nullptr;
  try {
    // prometheus-cpp 1.0 writes HELP verbatim: escape it here as the text format requires.
    family = &builder.Name(name)
                  .Help(absl::StrReplaceAll(help, {{"\\", "\\\\"}, {"\n", "\\n"}}))
                  .Register(*registry_);
  } catch (const std::exception&) {
    // The only failure left with a valid name: InsertBehavior::Throw on a name in use.
    return absl::InvalidArgumentError(absl::StrCat("metrics: '", name, "' is already registered"));
  }
  owned->push_back(std::make_unique<Family<T>>(family, labels, std::move(bounds)));
  Family<T>* raw = owned->back().get();
  if (labels.empty()) (void)raw->WithLabels({});
  return raw;
}

absl::StatusOr<CounterFamily*> Registry::AddCounter(const std::string& name,
                                                    const std::string& help,
                                                    const std::vector<std::string>& labels) {
  return Add<Counter>(prometheus::BuildCounter(), name, help, labels, {}, &counters_);
}

absl::StatusOr<GaugeFamily*> Registry::AddGauge(const std::string& name, const std::string& help,
                                                const std::vector<std::string>& labels) {
  return Add<Gauge>(prometheus::BuildGauge(), name, help, labels, {}, &gauges_);
}

absl::StatusOr<Counter*> Registry::AddUnlabeledCounter(const std::string& name,
                                                       const std::string& help) {
  absl::StatusOr<CounterFamily*> f = AddCounter(name, help);
  if (!f.ok()) return f.status();
  return (*f)->WithLabels({});
}

absl::StatusOr<Gauge*> Registry::AddUnlabeledGauge(const std::string& name,
                                                   const std::string& help) {
  absl::StatusOr<GaugeFamily*> f = AddGauge(name, help);
  if (!f.ok()) return f.status();
  return (*f)->WithLabels({});
}

absl::StatusOr<HistogramFamily*> Registry::AddHistogram(const std::string& name,
                                                        const std::string& help,
                                                        const std::vector<std::string>& labels,
                                                        std::vector<double> bounds) {
  if (!bounds.empty() && std::isinf(bounds.back()) && bounds.back() > 0) bounds.pop_back();
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metrics: histogram ", name, " buckets must be finite and strictly increasing"));
    }
  }
  if (std::find(labels.begin(), labels.end(), "le") != labels.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics: histogram ", name, " cannot use the reserved label 'le'"));
  }
  return Add<Histogram>(prometheus::BuildHistogram(), name, help, labels, std::move(bounds),
                        &histograms_);
}

std::string Registry::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

std::vector<double> LatencyBucketsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace specontext::metrics
