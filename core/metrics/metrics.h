// Metric families on prometheus-cpp (core; Debian 12 package prometheus-cpp-dev).
//
// One Registry, created by the service and passed to whoever records metrics (no globals), owns
// metric families. A family has a name, help text, a type and fixed label names; it holds one child
// per combination of label values. Children are prometheus-cpp's Counter, Gauge and Histogram,
// created on first use and living as long as the registry, so hot paths look a child up once and
// keep the pointer:
//
//   metrics::Registry registry;
//   ASSIGN_OR_RETURN(auto* requests, registry.AddCounter("spc_requests_total", "Requests.",
//   {"code"})); ASSIGN_OR_RETURN(metrics::Counter* ok, requests->WithLabels({"OK"}));
//   ok->Increment();                      // lock-free (one atomic add)
//
// What this layer adds to prometheus-cpp: label names fixed per family (values are given in the
// same order), a histogram family's buckets given once, errors as absl::Status instead of
// exceptions, and unlabelled families that export 0 from the start.
// Counters ignore negative increments; callers must not pass NaN (it would stick in a sum).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace specontext::metrics {

using Counter = prometheus::Counter;
using Gauge = prometheus::Gauge;
using Histogram = prometheus::Histogram;

/// Children of one metric type, keyed by label values. Thread-safe.
template <typename T>
class Family {
 public:
  /// `family` is owned by the registry; `bounds` only for histograms.
  Family(prometheus::Family<T>* family, std::vector<std::string> label_names,
         std::vector<double> bounds = {})
      : family_(family), label_names_(std::move(label_names)), bounds_(std::move(bounds)) {}
  const std::string& name() const { return family_->GetName(); }
  const std::vector<std::string>& label_names() const { return label_names_; }
  /// Bucket upper bounds of a histogram family (+Inf implied); empty otherwise.
  const std::vector<double>& bounds() const { return bounds_; }

  /// The child for `values` (one per label name, in order), created on first call. The pointer
  /// stays valid for the registry's lifetime. InvalidArgument when the count is wrong.
  absl::StatusOr<T*> WithLabels(const std::vector<std::string>& values);

 private:
  prometheus::Family<T>* family_;
  const std::vector<std::string> label_names_;
  const std::vector<double> bounds_;
};

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

/// Owns all metric families of one process (or one service); thread-safe.
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  /// Errors (InvalidArgument): bad metric or label name ([a-zA-Z_:][a-zA-Z0-9_:]* /
  /// [a-zA-Z_][a-zA-Z0-9_]*, no "__" prefix, no duplicates), a name already registered. A family
  /// without labels has its single child from the start (so it is exported as 0).
  absl::StatusOr<CounterFamily*> AddCounter(const std::string& name, const std::string& help,
                                            const std::vector<std::string>& labels = {});
  absl::StatusOr<GaugeFamily*> AddGauge(const std::string& name, const std::string& help,
                                        const std::vector<std::string>& labels = {});
  /// The single child of a new family without labels.
  absl::StatusOr<Counter*> AddUnlabeledCounter(const std::string& name, const std::string& help);
  absl::StatusOr<Gauge*> AddUnlabeledGauge(const std::string& name, const std::string& help);
  /// `bounds`: bucket upper bounds, strictly increasing and finite (a trailing +Inf is dropped:
  /// it is always implied). Label "le" is reserved.
  absl::StatusOr<HistogramFamily*> AddHistogram(const std::string& name, const std::string& help,
                                                const std::vector<std::string>& labels,
                                                std::vector<double> bounds);

  /// Text exposition format 0.0.4 of every family (prometheus-cpp's TextSerializer). Families
  /// with labels but no children yet are omitted.
  std::string Serialize() const;

 private:
  template <typename T, typename Builder>
  absl::StatusOr<Family<T>*> Add(Builder builder, const std::string& name, const std::string& help,
                                 const std::vector<std::string>& labels, std::vector<double> bounds,
                                 std::vector<std::unique_ptr<Family<T>>>* owned);

  const std::unique_ptr<prometheus::Registry> registry_;
  absl::Mutex mu_;  // guards the vectors below (prometheus::Registry locks itself)
  std::vector<std::unique_ptr<CounterFamily>> counters_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<GaugeFamily>> gauges_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<HistogramFamily>> histograms_ ABSL_GUARDED_BY(mu_);
};

/// Default latency buckets in seconds (1 ms .. 60 s), for TTFT/TPOT/retrieval latency.
std::vector<double> LatencyBucketsSeconds();

}  // namespace specontext::metrics
