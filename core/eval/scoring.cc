#include "core/eval/scoring.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace specontext {
namespace {

std::string Fold(std::string_view s, bool case_sensitive) {
  std::string out(s);
  if (!case_sensitive) absl::AsciiStrToLower(&out);
  return out;
}

std::string_view Strip(std::string_view s) {
  const size_t b = s.find_first_not_of(" \t\n\r\f\v");
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t\n\r\f\v") - b + 1);
}

// The first line with a non-blank character, trimmed ("" when there is none).
std::string_view FirstLine(std::string_view s) {
  while (!s.empty()) {
    const size_t nl = s.find('\n');
    const std::string_view line = Strip(s.substr(0, nl));
    if (!line.empty()) return line;
    if (nl == std::string_view::npos) break;
    s.remove_prefix(nl + 1);
  }
  return {};
}

}  // namespace

absl::StatusOr<Scoring> ParseScoring(std::string_view name) {
  if (name == "exact") return Scoring::kExact;
  if (name == "first_line_exact") return Scoring::kFirstLineExact;
  if (name == "contains") return Scoring::kContains;
  if (name == "contains_all") return Scoring::kContainsAll;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown scoring \"", std::string(name), "\" (exact, first_line_exact, contains or contains_all)"));
}

std::string_view ScoringName(Scoring scoring) {
  switch (scoring) {
    case Scoring::kExact: return "exact";
    case Scoring::kFirstLineExact: return "first_line_exact";
    case Scoring::kContains: return "contains";
    case Scoring::kContainsAll: return "contains_all";
  }
  return "?";
}

double ScoreText(Scoring scoring, bool case_sensitive, std::span<const std::string> answers,
                 std::string_view output) {
  if (answers.empty()) return 0;
  switch (scoring) {
    case Scoring::kExact:
    case Scoring::kFirstLineExact: {
      const std::string got = Fold(scoring == Scoring::kExact ? Strip(output) : FirstLine(output),
                                   case_sensitive);
      for (const std::string& a : answers) {
        if (Fold(Strip(a), case_sensitive) == got) return 1;
      }
      return 0;
    }
    case Scoring::kContains:
    case Scoring::kContainsAll: {
      const std::string text = Fold(output, case_sensitive);
      size_t found = 0;
      for (const std::string& a : answers) found += text.find(Fold(a, case_sensitive)) != std::string::npos;
      if (scoring == Scoring::kContains) return found > 0 ? 1 : 0;
      return static_cast<double>(found) / static_cast<double>(answers.size());
    }
  }
  return 0;
}

}  // namespace specontext
