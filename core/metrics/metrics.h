// A small Prometheus metrics module (prometheus-cpp is not packaged for Debian 12).
//
// One Registry, created by the service and passed to whoever records metrics (no globals), owns
// metric families. A family has a name, help text, a type and label names; it holds one child per
// combination of label values. Children are created on first use and live as long as the registry,
// so hot paths look a child up once and keep the pointer:
//
//   metrics::Registry registry;
//   ASSIGN_OR_RETURN(auto* requests, registry.AddCounter("spc_requests_total", "Requests.",
//   {"code"})); ASSIGN_OR_RETURN(metrics::Counter* ok, requests->WithLabels({"OK"}));
//   ok->Increment();                      // lock-free (one atomic add)
//
// Updates are atomics; only child creation and Serialize() take (per-family) locks.
// Serialize() renders the text exposition format 0.0.4 (see exposition.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace specontext::metrics {

enum class MetricType { kCounter, kGauge, kHistogram };

/// A monotonically increasing value. Negative or NaN increments are ignored.
class Counter {
 public:
  void Increment(double v = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

/// A value that goes up and down.
class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Increment(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  void Decrement(double v = 1.0) { value_.fetch_add(-v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

/// Observations counted into fixed buckets (upper bounds shared by the family, +Inf implied).
class Histogram {
 public:
  /// Point-in-time view: cumulative[i] counts observations <= bounds[i]; cumulative.back() (the
  /// +Inf bucket) equals count.
  struct Snapshot {
    std::vector<uint64_t> cumulative;  // [bounds.size() + 1]
    double sum = 0.0;
    uint64_t count = 0;
  };

  explicit Histogram(const std::vector<double>* bounds);
  /// Records `v` (NaN is ignored: it would poison the sum forever).
  void Observe(double v);
  Snapshot Collect() const;
  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  const std::vector<double>* bounds_;                 // owned by the family, sorted, finite
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // [bounds.size() + 1], not cumulative
  std::atomic<double> sum_{0.0};
};

/// What every family shares; Serialize() appends its exposition text.
class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, MetricType type, std::vector<std::string> labels)
      : name_(std::move(name)),
        help_(std::move(help)),
        type_(type),
        label_names_(std::move(labels)) {}
  virtual ~FamilyBase() = default;
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  virtual void Serialize(std::string* out) const = 0;

 protected:
  const std::string name_;
  const std::string help_;
  const MetricType type_;
  const std::vector<std::string> label_names_;
};

/// Children of one metric type, keyed by label values.
template <typename T>
class Family : public FamilyBase {
 public:
  using FamilyBase::FamilyBase;
  /// The child for `values` (one per label name, in order), created on first call. The pointer
  /// stays valid for the registry's lifetime. InvalidArgument when the count is wrong.
  absl::StatusOr<T*> WithLabels(const std::vector<std::string>& values);
  void Serialize(std::string* out) const override;

 protected:
  virtual std::unique_ptr<T> NewChild() const {
    if constexpr (std::is_default_constructible_v<T>) {
      return std::make_unique<T>();
    } else {
      return nullptr;  // overridden (HistogramFamily)
    }
  }

  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_ ABSL_GUARDED_BY(mu_);
};

class HistogramFamily : public Family<Histogram> {
 public:
  HistogramFamily(std::string name, std::string help, std::vector<std::string> labels,
                  std::vector<double> bounds)
      : Family<Histogram>(std::move(name), std::move(help), MetricType::kHistogram,
                          std::move(labels)),
        bounds_(std::move(bounds)) {}
  const std::vector<double>& bounds() const { return bounds_; }

 protected:
  std::unique_ptr<Histogram> NewChild() const override {
    return std::make_unique<Histogram>(&bounds_);
  }

 private:
  const std::vector<double> bounds_;
};

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;

/// Owns all metric families of one process (or one service); thread-safe.
class Registry {
 public:
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

  /// Text exposition format 0.0.4 of every family, in registration order; children sorted by
  /// label values. Families with labels but no children yet are omitted.
  std::string Serialize() const;

 private:
  absl::Status CheckNew(const std::string& name, const std::vector<std::string>& labels) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<FamilyBase>> families_ ABSL_GUARDED_BY(mu_);
};

/// Default latency buckets in seconds (1 ms .. 60 s), for TTFT/TPOT/retrieval latency.
std::vector<double> LatencyBucketsSeconds();

}  // namespace specontext::metrics
