// RemoteSparseDecoder's Observe messages: token ids and, for EAGLE-3 heads, the fused features of each
// token (the target's hidden states at the head's fusion layers of the position before it), recorded for
// replay after a reconnect and sent in messages that stay within the size limit.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/log.h"
#include "generator/remote_sparse_decoder.h"
#include "generator/remote_sparse_stream.h"

namespace specontext::generator {

void RemoteSparseDecoder::LearnHead(const Stream& s) {
  const ModelConfig& c = model_->config();
  std::vector<int32_t> layers(s.info.fusion_layers().begin(), s.info.fusion_layers().end());
  const int64_t width = s.info.fused_width();
  bool fits = width == static_cast<int64_t>(layers.size()) * c.hidden_size;
  for (int32_t l : layers) fits = fits && l >= 0 && l <= c.num_hidden_layers;
  if (!fits) {
    SPC_LOG(ERROR) << "the retriever's head does not fit the model: its fused features stay off (fallback steps)"
                   << Kv("fused_width", width) << Kv("fusion_layers", layers.size()) << Kv("hidden", c.hidden_size);
    layers.clear();
  }
  if (head_known_ && (layers != fusion_layers_)) {
    // Another head behind the same address: what was recorded for the old one cannot be replayed.
    for (auto& [id, seq] : seqs_) seq.features_complete = false;
  }
  fusion_layers_ = std::move(layers);
  fused_width_ = fits ? width : 0;
  if (s.info.max_tokens_per_observe() > 0) observe_tokens_ = s.info.max_tokens_per_observe();
  features_bf16_ = model_->backend()->compute_dtype() == DType::kBF16;
  head_known_ = true;
  // Sequences that observed tokens before these needs were known have no rows for them.
  for (auto& [id, seq] : seqs_) {
    if (fused_width_ > 0 && seq.features.size() != seq.tokens.size() * feature_bytes()) seq.features_complete = false;
  }
}

std::vector<float> RemoteSparseDecoder::PromptFeatures(const Seq& seq, const float* captured, int64_t first_row,
                                                      int64_t n) const {
  const int64_t fw = fused_width_;
  std::vector<float> rows(static_cast<size_t>(n * fw));
  // EAGLE-3 pairs token t with the features of position t-1 (zeros for position 0).
  std::copy(seq.last_features.begin(), seq.last_features.end(), rows.begin());
  for (int64_t j = 1; j < n; ++j) {
    std::memcpy(rows.data() + j * fw, captured + (first_row + j - 1) * fw, fw * sizeof(float));
  }
  return rows;
}

bool RemoteSparseDecoder::ObserveTokens(Stream* s, PendingObserves& batch, uint64_t id, Seq& seq,
                                        std::span<const int32_t> tokens, const float* fused) {
  const size_t from = seq.tokens.size();
  seq.tokens.insert(seq.tokens.end(), tokens.begin(), tokens.end());
  if (fused_width_ > 0) {
    if (fused == nullptr || !seq.features_complete) {
      seq.features_complete = false;
    } else {
      const size_t values = tokens.size() * static_cast<size_t>(fused_width_), at = seq.features.size();
      seq.features.resize(at + values * (features_bf16_ ? 2 : 4));
      uint8_t* out = seq.features.data() + at;
      for (size_t i = 0; i < values; ++i) {
        if (features_bf16_) {
          const uint16_t v = F32ToBf16(fused[i]);
          out[2 * i] = static_cast<uint8_t>(v & 0xff);
          out[2 * i + 1] = static_cast<uint8_t>(v >> 8);
        } else {
          std::memcpy(out + 4 * i, &fused[i], 4);  // little-endian hosts
        }
      }
    }
  }
  if (s == nullptr) return true;
  if (seq.session != s->generation) {
    // Admitted while the session was down: the next Usable() opens it and replays (when it can).
    if (fused_width_ == 0 || seq.features_complete) s->resynced = false;
    return true;
  }
  if (fused_width_ > 0 && !seq.features_complete) return true;  // the retriever cannot use it any more
  return QueueObserves(*s, batch, id, seq, from, seq.tokens.size());
}

bool RemoteSparseDecoder::QueueObserves(Stream& s, PendingObserves& batch, uint64_t id, const Seq& seq, size_t from,
                                        size_t to) {
  const size_t row_bytes = fused_width_ > 0 ? feature_bytes() : 0;
  const size_t max_tokens = static_cast<size_t>(std::max(1, observe_tokens_));
  size_t chunk = max_tokens;
  // The features payload of one message stays within options_.observe_message_bytes (default 1 MiB, far below
  // gRPC's default 4 MiB message limit) whatever the head's width.
  if (row_bytes > 0) chunk = std::clamp<size_t>(options_.observe_message_bytes / row_bytes, 1, chunk);
  for (size_t at = from; at < to; at += chunk) {
    const size_t end = std::min(to, at + chunk), n = end - at, bytes = n * row_bytes;
    // The retriever refuses an id named twice in a batch and more than max_tokens_per_observe over it.
    const bool full = batch.tokens + n > max_tokens || batch.bytes + bytes > options_.observe_message_bytes;
    if (batch.tokens > 0 && (full || batch.ids.contains(id)) && !FlushObserves(s, batch)) return false;
    v1::Observe* obs = batch.req.mutable_observe_batch()->add_observes();
    obs->set_sequence_id(id);
    obs->mutable_token_ids()->Add(seq.tokens.begin() + at, seq.tokens.begin() + end);
    if (row_bytes > 0) {
      obs->set_features_dtype(features_bf16_ ? v1::FEATURE_DTYPE_BF16 : v1::FEATURE_DTYPE_F32);
      obs->set_features(seq.features.data() + at * row_bytes, bytes);
    }
    batch.ids.insert(id);
    batch.tokens += n;
    batch.bytes += bytes;
  }
  return true;
}

bool RemoteSparseDecoder::FlushObserves(Stream& s, PendingObserves& batch) {
  if (batch.tokens == 0) return true;
  const bool ok = Send(s, batch.req);
  batch.req.Clear();
  batch.ids.clear();
  batch.tokens = 0;
  batch.bytes = 0;
  return ok;
}

}  // namespace specontext::generator
