#include "tools/specontext/recall_summary.h"

#include <algorithm>
#include <cmath>

namespace specontext {
namespace {

using json = nlohmann::json;

double Round4(double v) { return std::isfinite(v) ? std::round(v * 1e4) / 1e4 : v; }

// {"mean", "p10"} of `v` (reordered: nth_element). The p10 is the sample at rank floor(0.1 (n -
// 1)).
json MeanP10(std::vector<float>& v) {
  if (v.empty()) return {{"mean", nullptr}, {"p10", nullptr}};
  double sum = 0;
  for (float x : v) sum += x;
  const size_t k = (v.size() - 1) / 10;
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return {{"mean", Round4(sum / v.size())}, {"p10", Round4(v[k])}};
}

}  // namespace

nlohmann::ordered_json RecallStepLine(const AttentionRecallStep& step, int32_t seq) {
  using ojson = nlohmann::ordered_json;
  ojson mean = ojson::array(), min = ojson::array();
  for (int32_t l = 0; l < step.n_layers; ++l) {
    double sum = 0;
    float lo = 1.0f;
    for (int32_t h = 0; h < step.n_heads; ++h) {
      const float r = step.at(seq, l, h);
      sum += r;
      lo = std::isnan(r) ? r : std::min(lo, r);
    }
    mean.push_back(Round4(sum / std::max(1, step.n_heads)));
    min.push_back(Round4(lo));
  }
  ojson line = {
      {"position", step.positions[seq]}, {"recall", std::move(mean)}, {"min", std::move(min)}};
  if (static_cast<size_t>(seq) < step.head_mass.size())
    line["head_mass"] = Round4(step.head_mass[seq]);
  if (step.dense) line["dense"] = true;
  if (static_cast<size_t>(seq) < step.fallback.size() && step.fallback[seq] != 0) line["fallback"] = true;
  return line;
}

void RecallSummary::Add(const AttentionRecallStep& step, int32_t seq) {
  if (step.dense) {
    ++dense_steps_;
    return;
  }
  const int64_t position = step.positions[seq];
  Bucket& b = buckets_[std::upper_bound(edges_.begin(), edges_.end(), position) - edges_.begin()];
  ++b.steps;
  if (b.layers.size() < static_cast<size_t>(step.n_layers)) b.layers.resize(step.n_layers);
  for (int32_t l = 0; l < step.n_layers; ++l) {
    for (int32_t h = 0; h < step.n_heads; ++h) b.layers[l].push_back(step.at(seq, l, h));
  }
}

json RecallSummary::ToJson() const {
  // Per layer and overall, across buckets, then per bucket.
  std::vector<std::vector<float>> layers;
  std::vector<float> all;
  int64_t steps = 0;
  json buckets = json::array();
  for (size_t bi = 0; bi < buckets_.size(); ++bi) {
    const Bucket& b = buckets_[bi];
    if (b.steps == 0) continue;
    steps += b.steps;
    if (layers.size() < b.layers.size()) layers.resize(b.layers.size());
    std::vector<float> bucket_all;
    json bucket_layers = json::array();
    for (size_t l = 0; l < b.layers.size(); ++l) {
      std::vector<float> v = b.layers[l];
      layers[l].insert(layers[l].end(), v.begin(), v.end());
      bucket_all.insert(bucket_all.end(), v.begin(), v.end());
      bucket_layers.push_back(MeanP10(v));
    }
    json jb = MeanP10(bucket_all);
    jb["from"] = bi == 0 ? 0 : edges_[bi - 1];
    jb["to"] = bi < edges_.size() ? json(edges_[bi]) : json(nullptr);
    jb["steps"] = b.steps;
    jb["layers"] = std::move(bucket_layers);
    buckets.push_back(std::move(jb));
  }
  json per_layer = json::array();
  for (std::vector<float>& v : layers) {
    all.insert(all.end(), v.begin(), v.end());
    per_layer.push_back(MeanP10(v));
  }
  json out = MeanP10(all);
  out["steps"] = steps;
  out["dense_steps"] = dense_steps_;
  out["layers"] = std::move(per_layer);
  out["buckets"] = std::move(buckets);
  return out;
}

}  // namespace specontext
