// Generates a small but genuine HF byte-level BPE tokenizer.json (GPT-2 byte mapping, learned merges).
#include <algorithm>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tools/random_checkpoint/random_checkpoint.h"

namespace specontext {
namespace {

using json = nlohmann::json;

// Plain English prose written for this tool; merges learned on it make common words single tokens.
constexpr const char* kSample =
    "The little town sat at the edge of a quiet river, and every morning the baker opened his shop before the "
    "sun came up. He made bread, cakes and small sweet rolls that the children loved. When the bell above the "
    "door rang, he would look up from the oven and smile. People came from the other side of the river to buy "
    "his bread, because they said it was the best in the whole country. One day a girl named Anna walked in "
    "with her brother. They had saved their coins for a long time, and they wanted to buy the biggest cake in "
    "the shop. The baker asked them what the cake was for. Anna told him that their mother was sick and that "
    "they wanted to make her happy. The baker listened, and then he went to the back of the shop. He came back "
    "with a cake that was even bigger than the one they had seen, and he would not take their coins. The "
    "children thanked him again and again, and they carried the cake home with great care. Their mother was "
    "so happy that she laughed for the first time in many days. In the evening the whole family sat together "
    "at the table, and they talked about the kind baker and the river and the long walk home. Years later, "
    "when Anna was grown, she opened a shop of her own on the same street. She baked bread every morning, and "
    "when children came in with a handful of coins, she remembered the day the baker gave her the cake. "
    "Reasoning models think for a long time before they answer. They write out each step, check their work, "
    "and try again when something does not fit. A model that reads a long context has to remember what it has "
    "seen, and the memory it needs grows with every token. The cache of keys and values is stored for each "
    "layer and each head, so a long answer can use more memory than the model itself. Systems that serve such "
    "models move parts of the cache between the GPU and the host, and they try to load only the tokens that "
    "matter for the next step. In 2024 and 2025 many papers studied this problem, with numbers such as 8, 16, "
    "32 and 128 thousand tokens of context. The question is simple: which tokens will the model look at next, "
    "and can we know that before it asks?";

// GPT-2's reversible byte -> printable code point mapping, UTF-8 encoded.
std::vector<std::string> ByteToUnicode() {
  std::vector<std::string> out(256);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : 256 + extra++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {  // all code points here are < 0x800: two bytes
      s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
    out[b] = s;
  }
  return out;
}

enum class CharClass { kLetter, kDigit, kSpace, kOther };
CharClass Classify(unsigned char c) {
  if (std::isalpha(c)) return CharClass::kLetter;
  if (std::isdigit(c)) return CharClass::kDigit;
  if (std::isspace(c)) return CharClass::kSpace;
  return CharClass::kOther;
}

// Rough GPT-2 style pre-tokenisation: " ?letters", " ?digits", " ?punct", whitespace runs.
std::vector<std::string> PreTokenize(const std::string& text) {
  std::vector<std::string> words;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    if (text[j] == ' ' && j + 1 < text.size() && Classify(text[j + 1]) != CharClass::kSpace) ++j;
    const CharClass cls = Classify(text[j]);
    while (j < text.size() && Classify(text[j]) == cls) ++j;
    words.push_back(text.substr(i, j - i));
    i = j;
  }
  return words;
}

}  // namespace

absl::StatusOr<std::string> MakeByteLevelBpeTokenizerJson(int64_t vocab_size, const std::vector<SpecialToken>& specials,
                                                          const std::string& bos_content, int max_merges) {
  if (vocab_size < 256 + static_cast<int64_t>(specials.size())) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer vocab ", vocab_size, " is below 256 byte tokens + ",
                                                   specials.size(), " special tokens"));
  }
  std::map<int64_t, std::string> special_by_id;
  std::set<std::string> special_names;
  int64_t first_special = vocab_size;
  for (const SpecialToken& s : specials) {
    if (s.id < 256 || s.id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("special token ", s.content, " id ", s.id,
                                                     " must be in [256, ", vocab_size, ")"));
    }
    if (!special_by_id.emplace(s.id, s.content).second || !special_names.insert(s.content).second) {
      return absl::InvalidArgumentError(absl::StrCat("special token ", s.content, " (id ", s.id, ") is duplicated"));
    }
    first_special = std::min(first_special, s.id);
  }
  if (!bos_content.empty() && !special_names.count(bos_content)) {
    return absl::InvalidArgumentError(absl::StrCat("bos token ", bos_content, " is not among the special tokens"));
  }

  const std::vector<std::string> b2u = ByteToUnicode();
  json vocab = json::object();
  std::set<std::string> known;
  for (int b = 0; b < 256; ++b) {
    vocab[b2u[b]] = b;
    known.insert(b2u[b]);
  }
  // Word -> count, each word as a sequence of mapped symbols.
  std::map<std::vector<std::string>, int> words;
  for (const std::string& w : PreTokenize(kSample)) {
    std::vector<std::string> syms;
    for (unsigned char c : w) syms.push_back(b2u[c]);
    ++words[syms];
  }
  json merges = json::array();
  int64_t next_id = 256;
  const int64_t merge_limit = std::min<int64_t>(first_special, 256 + static_cast<int64_t>(max_merges));
  while (next_id < merge_limit) {
    std::map<std::pair<std::string, std::string>, int> pairs;
    for (const auto& [syms, n] : words) {
      for (size_t i = 0; i + 1 < syms.size(); ++i) pairs[{syms[i], syms[i + 1]}] += n;
    }
    // Most frequent pair; std::map order breaks ties deterministically.
    const std::pair<std::string, std::string>* best = nullptr;
    int best_n = 1;
    for (const auto& [p, n] : pairs) {
      if (n > best_n) {
        best = &p;
        best_n = n;
      }
    }
    if (best == nullptr) break;  // no pair occurs twice: the sample is exhausted
    const std::string a = best->first, b = best->second, ab = a + b;
    merges.push_back(a + " " + b);
    if (known.insert(ab).second) vocab[ab] = next_id++;
    std::map<std::vector<std::string>, int> merged;
    for (const auto& [syms, n] : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < syms.size(); ++i) {
        if (i + 1 < syms.size() && syms[i] == a && syms[i + 1] == b) {
          out.push_back(ab);
          ++i;
        } else {
          out.push_back(syms[i]);
        }
      }
      merged[out] += n;
    }
    words = std::move(merged);
  }

  json added = json::array();
  int64_t reserved = 0;
  for (int64_t id = next_id; id < vocab_size; ++id) {
    auto it = special_by_id.find(id);
    std::string content = it != special_by_id.end() ? it->second
                                                    : absl::StrCat("<|reserved_special_token_", reserved++, "|>");
    if (it == special_by_id.end() && special_names.count(content)) {
      return absl::InvalidArgumentError(absl::StrCat("special token name ", content, " clashes with a reserved name"));
    }
    added.push_back({{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false},  {"normalized", false}, {"special", true}});
  }

  json tok = json::object();
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = added;
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  if (bos_content.empty()) {
    tok["post_processor"] = nullptr;
  } else {
    const int64_t bos_id = [&] {
      for (const SpecialToken& s : specials) {
        if (s.content == bos_content) return s.id;
      }
      return int64_t{-1};
    }();
    json bos_a = {{"SpecialToken", {{"id", bos_content}, {"type_id", 0}}}};
    json bos_b = {{"SpecialToken", {{"id", bos_content}, {"type_id", 1}}}};
    json seq_a = {{"Sequence", {{"id", "A"}, {"type_id", 0}}}};
    json seq_b = {{"Sequence", {{"id", "B"}, {"type_id", 1}}}};
    tok["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", {bos_a, seq_a}},
        {"pair", {bos_a, seq_a, bos_b, seq_b}},
        {"special_tokens", {{bos_content, {{"id", bos_content}, {"ids", {bos_id}}, {"tokens", {bos_content}}}}}}};
  }
  tok["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"vocab", vocab},
                  {"merges", merges}};
  return tok.dump(1);
}

}  // namespace specontext
