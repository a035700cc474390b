// llama2.c's tokenizer.bin: SentencePiece pieces with scores, encoded as llama2.c's `encode` does
// (dummy-prefix space, code point lookup with <0xXX> byte fallback, then greedy best-score merges,
// done in O(n log n)).
#include <algorithm>
#include <cstring>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/tokenizer/string_map.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

constexpr int32_t kUnk = 0, kBos = 1, kEos = 2, kByteBase = 3;
constexpr float kNoMergeScore = -1e10f;

class Llama2cTokenizer final : public Tokenizer {
 public:
  Llama2cTokenizer(std::vector<std::string> pieces, std::vector<float> scores)
      : pieces_(std::move(pieces)), scores_(std::move(scores)) {
    // The first id wins for duplicate pieces, so lookups are deterministic.
    for (size_t i = 0; i < pieces_.size(); ++i)
      index_.try_emplace(pieces_[i], static_cast<int32_t>(i));
    // A token covers at most its piece's bytes: a code point's piece is its bytes, a byte's piece
    // ("<0xXX>") is longer than one byte, and a merge's piece is its two pieces. An empty piece
    // breaks that (merging with it absorbs a byte), so then no bound is claimed.
    size_t longest = 1;
    for (const std::string& p : pieces_) {
      if (p.empty()) return;
      longest = std::max(longest, p.size());
    }
    max_bytes_per_token_ = static_cast<int64_t>(longest);
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view raw, bool add_bos) const override {
    const std::string text = utf8::Sanitize(raw);
    std::vector<int32_t> ids;
    if (add_bos) ids.push_back(kBos);
    if (text.empty()) return ids;
    std::vector<int32_t> toks;
    // SentencePiece's add_dummy_prefix: the text is encoded as if it started with a space.
    if (auto space = Find(" ")) toks.push_back(*space);
    for (size_t i = 0; i < text.size();) {
      const size_t n = utf8::ValidSequenceLength(text, i);  // text is valid: n >= 1
      if (auto id = Find(std::string_view(text).substr(i, n))) {
        toks.push_back(*id);
      } else {
        for (size_t k = 0; k < n; ++k) {
          toks.push_back(static_cast<uint8_t>(text[i + k]) + kByteBase);
        }
      }
      i += n;
    }
    MergeBestPairs(&toks);
    ids.insert(ids.end(), toks.begin(), toks.end());
    return ids;
  }

  std::string TokenBytes(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const std::string& p = pieces_[id];
    // "<0xXX>" pieces stand for one raw byte.
    if (p.size() == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>') {
      unsigned byte = 0;
      for (int k = 3; k < 5; ++k) {
        const char c = p[k];
        const int v = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                             : -1;
        if (v < 0) return p;
        byte = byte * 16 + static_cast<unsigned>(v);
      }
      return std::string(1, static_cast<char>(byte));
    }
    return p;
  }

  // llama2.c strips the dummy-prefix space of the token after BOS; we also do it at the start of a
  // sequence (SentencePiece's decode removes the dummy prefix), so Decode(Encode(t)) == t.
  std::string TokenBytesAfter(int32_t prev_id, int32_t id) const override {
    std::string s = TokenBytes(id);
    if ((prev_id == kBos || prev_id == -1) && !s.empty() && s[0] == ' ') s.erase(0, 1);
    return s;
  }

  std::optional<int64_t> MaxBytesPerToken() const override { return max_bytes_per_token_; }
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return kBos; }
  bool default_add_bos() const override { return true; }
  std::vector<int32_t> eos_ids() const override { return {kEos}; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (token == "<s>") return kBos;
    if (token == "</s>") return kEos;
    if (token == "<unk>") return kUnk;
    return Find(token);
  }
  bool IsSpecial(int32_t id) const override { return id == kUnk || id == kBos || id == kEos; }

 private:
  // The token that merging `a` and `b` gives and its score; nullopt when the pair never merges.
  // llama2.c starts its search at -1e10 with a strict '>', so pairs scoring no higher (and NaN
  // scores) never merge.
  struct PairMerge {
    int32_t id;
    float score;
  };
  std::optional<PairMerge> MergeOf(int32_t a, int32_t b, std::string* buf) const {
    buf->assign(pieces_[a]);
    buf->append(pieces_[b]);
    const auto id = Find(*buf);
    if (!id || !(scores_[*id] > kNoMergeScore)) return std::nullopt;
    return PairMerge{*id, scores_[*id]};
  }

  // llama2.c merges the best-scoring adjacent pair (the leftmost of equal scores) until none is
  // left, rescanning all pairs per merge: quadratic in the prompt. The same merges in the same
  // order come from a heap of pair candidates over a linked list of symbols (SentencePiece's BPE):
  // a symbol keeps its first position, so the smallest position among equal scores is the leftmost
  // pair, and an entry whose two symbols changed since it was queued is skipped when popped.
  void MergeBestPairs(std::vector<int32_t>* toks) const {
    const int32_t n = static_cast<int32_t>(toks->size());
    if (n < 2) return;
    struct Symbol {
      int32_t id, prev, next;  // prev/next: -1 at the ends
    };
    struct Candidate {
      float score;
      int32_t left, right;        // symbol positions
      int32_t left_id, right_id;  // their ids when queued
      int32_t merged;
    };
    // The heap's top is the highest score, then the lowest position.
    auto lower = [](const Candidate& a, const Candidate& b) {
      if (a.score != b.score) return a.score < b.score;
      return a.left > b.left;
    };
    std::vector<Symbol> syms(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) syms[i] = {(*toks)[i], i - 1, i + 1 < n ? i + 1 : -1};
    std::vector<Candidate> heap;
    heap.reserve(static_cast<size_t>(n));
    std::string buf;
    auto consider = [&](int32_t left) {
      const int32_t right = syms[left].next;
      if (right < 0) return;
      const auto m = MergeOf(syms[left].id, syms[right].id, &buf);
      if (!m) return;
      heap.push_back({m->score, left, right, syms[left].id, syms[right].id, m->id});
      std::push_heap(heap.begin(), heap.end(), lower);
    };
    for (int32_t i = 0; i + 1 < n; ++i) consider(i);
    std::vector<bool> alive(static_cast<size_t>(n), true);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), lower);
      const Candidate c = heap.back();
      heap.pop_back();
      Symbol& left = syms[c.left];
      if (!alive[c.left] || left.next != c.right || left.id != c.left_id ||
          syms[c.right].id != c.right_id) {
        continue;
      }
      Symbol& right = syms[c.right];
      left.id = c.merged;
      alive[c.right] = false;
      left.next = right.next;
      if (right.next >= 0) syms[right.next].prev = c.left;
      if (left.prev >= 0) consider(left.prev);
      consider(c.left);
    }
    toks->clear();
    for (int32_t i = 0; i >= 0; i = syms[i].next) toks->push_back(syms[i].id);
  }

  std::optional<int32_t> Find(std::string_view s) const {
    const auto it = index_.find(s);
    if (it == index_.end()) return std::nullopt;
    return it->second;
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  StringMap<int32_t> index_;
  std::optional<int64_t> max_bytes_per_token_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseLlama2cTokenizer(std::string_view data) {
  size_t off = 0;
  auto read = [&](void* dst, size_t n) {
    if (data.size() - off < n) return false;
    std::memcpy(dst, data.data() + off, n);
    off += n;
    return true;
  };
  int32_t max_len = 0;
  if (!read(&max_len, 4) || max_len <= 0) {
    return absl::InvalidArgumentError("llama2.c tokenizer: missing or bad max_token_length");
  }
  std::vector<std::string> pieces;
  std::vector<float> scores;
  while (off < data.size()) {
    float score = 0;
    int32_t len = 0;
    if (!read(&score, 4) || !read(&len, 4)) {
      return absl::InvalidArgumentError(
          absl::StrCat("llama2.c tokenizer: truncated header of token ", pieces.size()));
    }
    if (len < 0 || len > max_len || data.size() - off < static_cast<size_t>(len)) {
      return absl::InvalidArgumentError(
          absl::StrCat("llama2.c tokenizer: bad length ", len, " of token ", pieces.size()));
    }
    pieces.emplace_back(data.substr(off, static_cast<size_t>(len)));
    scores.push_back(score);
    off += static_cast<size_t>(len);
  }
  if (pieces.size() < kByteBase + 256) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer: only ", pieces.size(),
                                                   " tokens; need <unk>, <s>, </s> and 256 bytes"));
  }
  return std::unique_ptr<Tokenizer>(new Llama2cTokenizer(std::move(pieces), std::move(scores)));
}

}  // namespace specontext
