#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/metrics/exposition.h"
#include "core/metrics/metrics.h"

namespace specontext::metrics {

void Counter::Increment(double v) {
  if (!(v >= 0.0)) return;  // also rejects NaN: a counter never goes down
  value_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds_->size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  // First bound >= v: Prometheus buckets are "le" (less than or equal).
  const size_t i = std::lower_bound(bounds_->begin(), bounds_->end(), v) - bounds_->begin();
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Collect() const {
  Snapshot s;
  s.cumulative.resize(bounds_->size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    total += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = total;
  }
  // count is the +Inf bucket, so _count and le="+Inf" always agree even while others observe.
  s.count = total;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

template <typename T>
absl::StatusOr<T*> Family<T>::WithLabels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: ", name_, " has ", label_names_.size(),
                                                   " labels (", absl::StrJoin(label_names_, ","),
                                                   "), got ", values.size(), " values"));
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = children_.find(values);
    if (it != children_.end()) return it->second.get();
  }
  absl::MutexLock lock(&mu_);
  auto& slot = children_[values];
  if (slot == nullptr) slot = NewChild();
  return slot.get();
}

template <typename T>
void Family<T>::Serialize(std::string* out) const {
  absl::ReaderMutexLock lock(&mu_);
  if (children_.empty()) return;
  static constexpr const char* kTypeNames[] = {"counter", "gauge", "histogram"};
  absl::StrAppend(out, "# HELP ", name_, " ", EscapeHelp(help_), "\n# TYPE ", name_, " ",
                  kTypeNames[static_cast<int>(type_)], "\n");
  for (const auto& [values, child] : children_)
    AppendSamples(name_, label_names_, values, *child, out);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

absl::Status Registry::CheckNew(const std::string& name,
                                const std::vector<std::string>& labels) const {
  if (!IsValidMetricName(name)) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: invalid metric name '", name, "'"));
  }
  std::set<std::string> seen;
  for (const std::string& l : labels) {
    if (!IsValidLabelName(l)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: invalid label name '", l, "' in ", name));
    }
    if (!seen.insert(l).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: label '", l, "' repeated in ", name));
    }
  }
  for (const auto& f : families_) {
    if (f->name() == name) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics: '", name, "' is already registered"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CounterFamily*> Registry::AddCounter(const std::string& name,
                                                    const std::string& help,
                                                    const std::vector<std::string>& labels) {
  absl::MutexLock lock(&mu_);
  if (absl::Status st = CheckNew(name, labels); !st.ok()) return st;
  auto family = std::make_unique<CounterFamily>(name, help, MetricType::kCounter, labels);
  CounterFamily* raw = family.get();
  if (labels.empty()) (void)raw->WithLabels({});
  families_.push_back(std::move(family));
  return raw;
}

absl::StatusOr<GaugeFamily*> Registry::AddGauge(const std::string& name, const std::string& help,
                                                const std::vector<std::string>& labels) {
  absl::MutexLock lock(&mu_);
  if (absl::Status st = CheckNew(name, labels); !st.ok()) return st;
  auto family = std::make_unique<GaugeFamily>(name, help, MetricType::kGauge, labels);
  GaugeFamily* raw = family.get();
  if (labels.empty()) (void)raw->WithLabels({});
  families_.push_back(std::move(family));
  return raw;
}

absl::StatusOr<Counter*> Registry::AddUnlabeledCounter(const std::string& name, const std::string& help) {
  absl::StatusOr<CounterFamily*> f = AddCounter(name, help);
  if (!f.ok()) return f.status();
  return (*f)->WithLabels({});
}

absl::StatusOr<Gauge*> Registry::AddUnlabeledGauge(const std::string& name, const std::string& help) {
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
  absl::MutexLock lock(&mu_);
  if (absl::Status st = CheckNew(name, labels); !st.ok()) return st;
  auto family = std::make_unique<HistogramFamily>(name, help, labels, std::move(bounds));
  HistogramFamily* raw = family.get();
  if (labels.empty()) (void)raw->WithLabels({});
  families_.push_back(std::move(family));
  return raw;
}

std::string Registry::Serialize() const {
  absl::ReaderMutexLock lock(&mu_);
  std::string out;
  for (const auto& f : families_) f->Serialize(&out);
  return out;
}

std::vector<double> LatencyBucketsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace specontext::metrics
