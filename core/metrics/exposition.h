// Pieces of the Prometheus text exposition format 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/), shared by the families.
#pragma once

#include <string>
#include <vector>

namespace specontext::metrics {

/// Content-Type of a /metrics response in this format.
inline constexpr char kExpositionContentType[] = "text/plain; version=0.0.4; charset=utf-8";

/// HELP text: backslash -> \\, newline -> \n.
std::string EscapeHelp(const std::string& s);
/// Label value: backslash -> \\, double quote -> \", newline -> \n.
std::string EscapeLabelValue(const std::string& s);
/// Shortest round-trip decimal; "+Inf", "-Inf", "NaN" for the specials.
std::string FormatValue(double v);
/// `{a="x",b="y"}` (with `extra_name="extra_value"` appended when extra_name is non-empty), or ""
/// when there are no labels at all.
std::string FormatLabels(const std::vector<std::string>& names,
                         const std::vector<std::string>& values, const std::string& extra_name = "",
                         const std::string& extra_value = "");

class Counter;
class Gauge;
class Histogram;
/// Appends the sample line(s) of one child: `name{labels} value` (histograms: _bucket lines with
/// cumulative counts and le, then _sum and _count).
void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Counter& c, std::string* out);
void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Gauge& g, std::string* out);
void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Histogram& h, std::string* out);

bool IsValidMetricName(const std::string& s);
bool IsValidLabelName(const std::string& s);

}  // namespace specontext::metrics
