// Scoring of a generated text against the accepted answers of a task: the small set of rules that covers
// RULER's metrics (string_match_all, string_match_part) and the exact-answer tasks.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace specontext {

/// How an output is compared with the accepted answers (case-insensitive unless the task says otherwise;
/// the folding is ASCII only). Scores are in [0, 1].
enum class Scoring : uint8_t {
  kExact,           // "exact": the output, trimmed of surrounding whitespace, equals an answer (trimmed)
  kFirstLineExact,  // "first_line_exact": the first non-blank line of the output, trimmed, equals an answer
  kContains,        // "contains": 1 when any answer is a substring of the output (RULER string_match_part)
  kContainsAll,     // "contains_all": the fraction of the answers that are substrings (RULER string_match_all)
};

/// "exact", "first_line_exact", "contains", "contains_all"; InvalidArgument naming the choices otherwise.
absl::StatusOr<Scoring> ParseScoring(std::string_view name);
std::string_view ScoringName(Scoring scoring);

/// The score of `output` against `answers` in [0, 1]; 0 when `answers` is empty.
double ScoreText(Scoring scoring, bool case_sensitive, std::span<const std::string> answers,
                 std::string_view output);

}  // namespace specontext
