// Pre-tokenizers of tokenizer.json: Split (regex or literal, all five delimiter behaviours),
// ByteLevel (GPT-2 byte map, optional prefix space and GPT-2 regex), Metaspace, Digits, Sequence.
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/hf_common.h"
#include "core/tokenizer/hf_pipeline.h"

namespace specontext {
namespace {

using nlohmann::json;
using Range = std::pair<size_t, size_t>;

// The pattern GPT-2 (and HF's ByteLevel with use_regex) splits words with.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits `piece` at the matches of `pattern` following HF's SplitDelimiterBehavior, appending the
// non-empty parts to `out`.
absl::Status SplitPiece(const PreToken& piece, const Pattern& pattern, Behavior behavior,
                        bool invert, std::vector<PreToken>* out) {
  std::vector<Range> matches;
  RETURN_IF_ERROR(pattern.FindAll(piece.text, &matches));
  // The whole piece as alternating (range, is_delimiter) parts.
  std::vector<std::pair<Range, bool>> parts;
  size_t prev = 0;
  for (const auto& [s, e] : matches) {
    if (prev != s) parts.push_back({{prev, s}, invert});
    parts.push_back({{s, e}, !invert});
    prev = e;
  }
  if (prev != piece.text.size()) parts.push_back({{prev, piece.text.size()}, invert});

  std::vector<Range> kept;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const auto& [r, is_match] : parts)
        if (!is_match) kept.push_back(r);
      break;
    case Behavior::kIsolated:
      for (const auto& [r, is_match] : parts) kept.push_back(r);
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& [r, is_match] : parts) {
        if (is_match && !previous_match && !kept.empty())
          kept.back().second = r.second;
        else
          kept.push_back(r);
        previous_match = is_match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->second && !previous_match && !kept.empty())
          kept.back().first = it->first.first;
        else
          kept.push_back(it->first);
        previous_match = it->second;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    case Behavior::kContiguous:
      for (const auto& [r, is_match] : parts) {
        if (is_match == previous_match && !kept.empty())
          kept.back().second = r.second;
        else
          kept.push_back(r);
        previous_match = is_match;
      }
      break;
  }
  for (const auto& [s, e] : kept) {
    if (s < e) out->push_back({piece.text.substr(s, e - s), piece.at_start && s == 0});
  }
  return absl::OkStatus();
}

class Split final : public PreTokenizer {
 public:
  Split(std::unique_ptr<Pattern> p, Behavior b, bool invert)
      : pattern_(std::move(p)), behavior_(b), invert_(invert) {}
  absl::Status Apply(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> out;
    for (const PreToken& p : *pieces) {
      RETURN_IF_ERROR(SplitPiece(p, *pattern_, behavior_, invert_, &out));
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  Behavior behavior_;
  bool invert_;
};

class ByteLevel final : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, std::unique_ptr<Pattern> gpt2)
      : add_prefix_space_(add_prefix_space), gpt2_(std::move(gpt2)) {}
  absl::Status Apply(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> split;
    for (PreToken& p : *pieces) {
      // HF adds the space to every piece reaching this stage, not only the first.
      // (Assignment, not insert(): GCC 12 reports a false -Wrestrict on insert(0, " ").)
      if (add_prefix_space_ && (p.text.empty() || p.text[0] != ' ')) p.text = " " + p.text;
      if (gpt2_) {
        RETURN_IF_ERROR(SplitPiece(p, *gpt2_, Behavior::kIsolated, false, &split));
      } else if (!p.text.empty()) {
        split.push_back(std::move(p));
      }
    }
    for (PreToken& p : split) p.text = byte_level::Encode(p.text);
    *pieces = std::move(split);
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Pattern> gpt2_;  // null when use_regex is false
};

class Metaspace final : public PreTokenizer {
 public:
  enum class Prepend { kAlways, kFirst, kNever };
  Metaspace(std::string replacement, Prepend prepend, bool split)
      : replacement_(std::move(replacement)),
        prepend_(prepend),
        split_(split),
        delimiter_(Pattern::Literal(replacement_)) {}
  absl::Status Apply(std::vector<PreToken>* pieces) const override {
    std::vector<PreToken> out;
    for (PreToken& p : *pieces) {
      std::string text;
      for (const char c : p.text) {
        if (c == ' ')
          text += replacement_;
        else
          text.push_back(c);
      }
      const bool has = text.compare(0, replacement_.size(), replacement_) == 0;
      if (!has && (prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && p.at_start))) {
        text.insert(0, replacement_);
      }
      PreToken t{std::move(text), p.at_start};
      if (split_) {
        RETURN_IF_ERROR(SplitPiece(t, *delimiter_, Behavior::kMergedWithNext, false, &out));
      } else if (!t.text.empty()) {
        out.push_back(std::move(t));
      }
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::string replacement_;
  Prepend prepend_;
  bool split_;
  std::unique_ptr<Pattern> delimiter_;
};

class Sequence final : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> s) : steps_(std::move(s)) {}
  absl::Status Apply(std::vector<PreToken>* pieces) const override {
    for (const auto& s : steps_) RETURN_IF_ERROR(s->Apply(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

absl::StatusOr<Behavior> ParseBehavior(const json& j) {
  ASSIGN_OR_RETURN(const std::string b, GetString(j, "behavior", "Split pre-tokenizer"));
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return absl::InvalidArgumentError(
      absl::StrCat("Split pre-tokenizer: unknown behavior '", b, "'"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const json& j) {
  if (j.is_null()) return nullptr;
  ASSIGN_OR_RETURN(const std::string type, ComponentType(j, "pre_tokenizer"));
  if (type == "Split") {
    ASSIGN_OR_RETURN(auto pattern, MakePattern(j, "Split pre-tokenizer"));
    ASSIGN_OR_RETURN(const Behavior behavior, ParseBehavior(j));
    ASSIGN_OR_RETURN(const bool invert, GetBool(j, "invert", false, "Split pre-tokenizer"));
    return std::make_unique<Split>(std::move(pattern), behavior, invert);
  }
  if (type == "ByteLevel") {
    ASSIGN_OR_RETURN(const bool prefix, GetBool(j, "add_prefix_space", true, "ByteLevel"));
    ASSIGN_OR_RETURN(const bool use_regex, GetBool(j, "use_regex", true, "ByteLevel"));
    std::unique_ptr<Pattern> gpt2;
    if (use_regex) {
      ASSIGN_OR_RETURN(gpt2, Pattern::FromRegex(kGpt2Pattern));
    }
    return std::make_unique<ByteLevel>(prefix, std::move(gpt2));
  }
  if (type == "Digits") {
    // HF splits on char::is_numeric (general categories Nd, Nl, No = \p{N}): each digit alone
    // (Isolated) with individual_digits, else runs of digits (Contiguous), which a Split on the
    // same class expresses exactly.
    ASSIGN_OR_RETURN(const bool individual,
                     GetBool(j, "individual_digits", false, "Digits pre-tokenizer"));
    ASSIGN_OR_RETURN(auto pattern, Pattern::FromRegex(individual ? R"(\p{N})" : R"(\p{N}+)"));
    return std::make_unique<Split>(std::move(pattern), Behavior::kIsolated, false);
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string rep, GetString(j, "replacement", "Metaspace pre-tokenizer"));
    if (rep.empty())
      return absl::InvalidArgumentError("Metaspace pre-tokenizer: empty replacement");
    ASSIGN_OR_RETURN(const bool legacy_prefix,
                     GetBool(j, "add_prefix_space", true, "Metaspace pre-tokenizer"));
    Metaspace::Prepend prepend =
        legacy_prefix ? Metaspace::Prepend::kAlways : Metaspace::Prepend::kNever;
    if (const auto it = j.find("prepend_scheme"); it != j.end() && !it->is_null()) {
      const std::string s = it->is_string() ? it->get<std::string>() : "";
      if (s == "always")
        prepend = Metaspace::Prepend::kAlways;
      else if (s == "first")
        prepend = Metaspace::Prepend::kFirst;
      else if (s == "never")
        prepend = Metaspace::Prepend::kNever;
      else
        return absl::InvalidArgumentError("Metaspace pre-tokenizer: bad prepend_scheme");
    }
    ASSIGN_OR_RETURN(const bool split, GetBool(j, "split", true, "Metaspace pre-tokenizer"));
    return std::make_unique<Metaspace>(std::move(rep), prepend, split);
  }
  if (type == "Sequence") {
    const auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) {
      return absl::InvalidArgumentError("Sequence pre-tokenizer: 'pretokenizers' must be an array");
    }
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const auto& sub : *it) {
      ASSIGN_OR_RETURN(auto step, MakePreTokenizer(sub));
      if (step) steps.push_back(std::move(step));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  return absl::UnimplementedError(absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
}

}  // namespace specontext
