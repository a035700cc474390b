// Rebuilds the merges of a SentencePiece BPE vocabulary (GGUF "llama" tokenizers carry pieces and
// scores but no merges) in the order HF's converters give them, so the BPE model ranks pairs as
// the HF tokenizer.json of the same model does. Facts from transformers' generate_merges
// (tokenization_utils_base.py) as its GGUF tokenizer path calls it (get_merges with the scores).
#include <algorithm>
#include <cstdint>

#include "absl/container/flat_hash_map.h"
#include "core/io/gguf_vocab_internal.h"

namespace specontext::gguf_vocab {
namespace {

// Bytes of the UTF-8 sequence led by `c` (the input is valid UTF-8).
size_t SequenceLength(unsigned char c) {
  if (c < 0x80) return 1;
  if (c < 0xE0) return 2;
  if (c < 0xF0) return 3;
  return 4;
}

struct Candidate {
  int32_t left, right;  // ids the parts resolve to
  float score;          // score of the merged piece
  int32_t left_chars, right_chars;
};

}  // namespace

std::vector<std::pair<std::string_view, std::string_view>> SentencePieceMerges(
    const std::vector<std::string>& pieces, const std::vector<float>& scores) {
  // piece -> id of its last occurrence (what a lookup resolves to, like Python's dict).
  absl::flat_hash_map<std::string_view, int32_t> id_of;
  id_of.reserve(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) id_of[pieces[i]] = static_cast<int32_t>(i);

  std::vector<Candidate> merges;
  std::vector<Candidate> local;
  absl::flat_hash_map<std::string_view, bool> seen;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const std::string_view piece = pieces[i];
    if (!seen.try_emplace(piece, true).second) continue;  // duplicates count once, first position
    const float score = scores[static_cast<size_t>(id_of[piece])];
    // Code point boundaries: Python slices the piece by characters.
    std::vector<size_t> cuts;
    for (size_t b = 0; b < piece.size();
         b += SequenceLength(static_cast<unsigned char>(piece[b]))) {
      if (b > 0) cuts.push_back(b);
    }
    const int32_t n_chars = static_cast<int32_t>(cuts.size()) + 1;
    local.clear();
    for (size_t k = 0; k < cuts.size(); ++k) {
      const auto l = id_of.find(piece.substr(0, cuts[k]));
      if (l == id_of.end()) continue;
      const auto r = id_of.find(piece.substr(cuts[k]));
      if (r == id_of.end()) continue;
      const int32_t left_chars = static_cast<int32_t>(k) + 1;
      local.push_back({l->second, r->second, score, left_chars, n_chars - left_chars});
    }
    // Within a piece: by (left id, right id).
    std::stable_sort(local.begin(), local.end(), [](const Candidate& a, const Candidate& b) {
      return a.left != b.left ? a.left < b.left : a.right < b.right;
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  // sorted(key=(score, len(left), len(right)), reverse=True) keeps equal keys in order.
  std::stable_sort(merges.begin(), merges.end(), [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.left_chars != b.left_chars) return a.left_chars > b.left_chars;
    return a.right_chars > b.right_chars;
  });
  std::vector<std::pair<std::string_view, std::string_view>> out;
  out.reserve(merges.size());
  for (const Candidate& m : merges) out.emplace_back(pieces[m.left], pieces[m.right]);
  return out;
}

}  // namespace specontext::gguf_vocab
