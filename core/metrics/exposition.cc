#include "core/metrics/exposition.h"

#include <charconv>
#include <cmath>

#include "core/metrics/metrics.h"

namespace specontext::metrics {

std::string EscapeHelp(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string EscapeLabelValue(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, end);
}

std::string FormatLabels(const std::vector<std::string>& names,
                         const std::vector<std::string>& values, const std::string& extra_name,
                         const std::string& extra_value) {
  if (names.empty() && extra_name.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    out += EscapeLabelValue(values[i]);
    out += '"';
  }
  if (!extra_name.empty()) {
    if (!names.empty()) out += ',';
    out += extra_name;
    out += "=\"";
    out += EscapeLabelValue(extra_value);
    out += '"';
  }
  out += '}';
  return out;
}

void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Counter& c, std::string* out) {
  *out += name + FormatLabels(label_names, values) + ' ' + FormatValue(c.Value()) + '\n';
}

void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Gauge& g, std::string* out) {
  *out += name + FormatLabels(label_names, values) + ' ' + FormatValue(g.Value()) + '\n';
}

void AppendSamples(const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const Histogram& h, std::string* out) {
  const Histogram::Snapshot snap = h.Collect();
  const std::vector<double>& bounds = h.bounds();
  for (size_t i = 0; i <= bounds.size(); ++i) {
    const std::string le = i < bounds.size() ? FormatValue(bounds[i]) : "+Inf";
    *out += name + "_bucket" + FormatLabels(label_names, values, "le", le) + ' ' +
            std::to_string(snap.cumulative[i]) + '\n';
  }
  const std::string labels = FormatLabels(label_names, values);
  *out += name + "_sum" + labels + ' ' + FormatValue(snap.sum) + '\n';
  *out += name + "_count" + labels + ' ' + std::to_string(snap.count) + '\n';
}

namespace {
bool IsNameChar(char c, bool first, bool colon) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return true;
  if (colon && c == ':') return true;
  return !first && c >= '0' && c <= '9';
}
}  // namespace

bool IsValidMetricName(const std::string& s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (!IsNameChar(s[i], i == 0, /*colon=*/true)) return false;
  }
  return true;
}

bool IsValidLabelName(const std::string& s) {
  if (s.empty() || s.rfind("__", 0) == 0) return false;  // "__" prefix is reserved
  for (size_t i = 0; i < s.size(); ++i) {
    if (!IsNameChar(s[i], i == 0, /*colon=*/false)) return false;
  }
  return true;
}

}  // namespace specontext::metrics
