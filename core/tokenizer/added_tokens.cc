#include "core/tokenizer/added_tokens.h"

#include "core/tokenizer/hf_common.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

// The code point ending just before `pos`, or -1 at the start.
int64_t CharBefore(std::string_view s, size_t pos) {
  if (pos == 0) return -1;
  size_t b = pos - 1;
  while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80 && pos - b < 4) --b;
  const size_t n = utf8::ValidSequenceLength(s, b);
  return n == pos - b ? static_cast<int64_t>(utf8::DecodeAt(s, b, n)) : -1;
}

int64_t CharAt(std::string_view s, size_t pos) {
  if (pos >= s.size()) return -1;
  const size_t n = utf8::ValidSequenceLength(s, pos);
  return n == 0 ? -1 : static_cast<int64_t>(utf8::DecodeAt(s, pos, n));
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>* tokens, bool normalized,
                                     const std::vector<std::string>& match_texts)
    : tokens_(tokens), nodes_(1) {
  for (size_t t = 0; t < tokens->size(); ++t) {
    const AddedToken& tok = (*tokens)[t];
    if (tok.normalized != normalized) continue;
    Add(static_cast<int>(t), t < match_texts.size() ? match_texts[t] : tok.content);
  }
}

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>* tokens,
                                     absl::FunctionRef<bool(const AddedToken&)> include)
    : tokens_(tokens), nodes_(1) {
  for (size_t t = 0; t < tokens->size(); ++t) {
    if (include((*tokens)[t])) Add(static_cast<int>(t), (*tokens)[t].content);
  }
}

void AddedTokenMatcher::Add(int index, std::string_view text) {
  if (text.empty()) return;
  int32_t node = 0;
  for (const char c : text) {
    const auto it = nodes_[node].next.find(static_cast<unsigned char>(c));
    if (it != nodes_[node].next.end()) {
      node = it->second;
    } else {
      nodes_.emplace_back();
      const int32_t child = static_cast<int32_t>(nodes_.size() - 1);
      nodes_[node].next[static_cast<unsigned char>(c)] = child;
      node = child;
    }
  }
  if (nodes_[node].token < 0) nodes_[node].token = index;  // first one wins
}

int AddedTokenMatcher::LongestAt(std::string_view text, size_t pos, MatchFilter allow,
                                 size_t* len) const {
  int best = -1;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto it = nodes_[node].next.find(static_cast<unsigned char>(text[i]));
    if (it == nodes_[node].next.end()) break;
    node = it->second;
    if (nodes_[node].token >= 0 && allow(nodes_[node].token, pos, i + 1)) {
      best = nodes_[node].token;
      *len = i + 1 - pos;
    }
  }
  return best;
}

std::vector<TextSegment> AddedTokenMatcher::Split(std::string_view text) const {
  return Split(text, [](int, size_t, size_t) { return true; });
}

std::vector<TextSegment> AddedTokenMatcher::Split(std::string_view text, MatchFilter allow) const {
  std::vector<TextSegment> out;
  size_t emitted = 0;  // end of the last segment pushed
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = 0;
    const int t = empty() ? -1 : LongestAt(text, pos, allow, &len);
    if (t < 0) {
      ++pos;
      continue;
    }
    const AddedToken& tok = (*tokens_)[t];
    size_t start = pos, stop = pos + len;
    pos = stop;  // matches never overlap, even when this one is rejected
    if (tok.single_word) {
      const int64_t before = CharBefore(text, start), after = CharAt(text, stop);
      if ((before >= 0 && IsWordChar(static_cast<char32_t>(before))) ||
          (after >= 0 && IsWordChar(static_cast<char32_t>(after)))) {
        continue;
      }
    }
    if (tok.lstrip) {
      while (start > emitted) {
        const int64_t c = CharBefore(text, start);
        if (c < 0 || !IsWhiteSpace(static_cast<char32_t>(c))) break;
        size_t n = 1;
        while ((static_cast<uint8_t>(text[start - n]) & 0xC0) == 0x80) ++n;
        start -= n;
      }
    }
    if (tok.rstrip) stop = SkipWhiteSpace(text, stop);
    if (emitted < start) out.push_back({-1, emitted, start});
    out.push_back({t, start, stop});
    emitted = pos = stop;
  }
  if (emitted < text.size()) out.push_back({-1, emitted, text.size()});
  return out;
}

}  // namespace specontext
