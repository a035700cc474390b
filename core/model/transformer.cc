#include "core/model/transformer.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

std::string LayerName(int l, const char* suffix) { return absl::StrCat("model.layers.", l, ".", suffix); }

}  // namespace

absl::StatusOr<ModelConfig> ShardConfig(const ModelConfig& config, const TensorParallel& tp) {
  if (tp.size < 1 || tp.rank < 0 || tp.rank >= tp.size) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: rank ", tp.rank, " of ", tp.size));
  }
  if (tp.size == 1) return config;
  if (tp.comm == nullptr || tp.comm->size() != tp.size || tp.comm->rank() != tp.rank) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: rank ", tp.rank, " of ", tp.size,
                                                   " needs a communicator of that rank and size"));
  }
  const int64_t nkv = config.num_key_value_heads;
  if (tp.size > nkv || nkv % tp.size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp.size, " does not split the model's ", nkv,
                                                   " KV heads: it must be at most and divide the KV heads"));
  }
  if (config.num_attention_heads % tp.size != 0 || config.intermediate_size % tp.size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp.size, " does not divide the model's ",
                                                   config.num_attention_heads, " attention heads and ",
                                                   "intermediate size ", config.intermediate_size));
  }
  ModelConfig c = config;
  c.num_attention_heads /= tp.size;
  c.num_key_value_heads /= tp.size;
  c.intermediate_size /= tp.size;
  return c;
}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Load(const Checkpoint& checkpoint,
                                                               Backend* backend,
                                                               const LoadProgress& progress,
                                                               const TensorParallel& tp) {
  if (checkpoint.weights == nullptr) return absl::InvalidArgumentError("checkpoint has no weights");
  ASSIGN_OR_RETURN(ModelConfig config, ShardConfig(checkpoint.config, tp));
  std::unique_ptr<Transformer> model(new Transformer(config, backend));
  model->tp_ = tp;
  RETURN_IF_ERROR(model->LoadWeights(*checkpoint.weights, progress));
  ASSIGN_OR_RETURN(RopeFrequencies freqs, ComputeRopeFrequencies(model->config_));
  Tensor host(freqs.inv_freq.data(), DType::kF32, {static_cast<int64_t>(freqs.inv_freq.size())});
  ASSIGN_OR_RETURN(model->inv_freq_, backend->ToDevice(host, DType::kF32, MemoryKind::kWeights));
  model->rope_.inv_freq = &model->inv_freq_;
  model->rope_.interleaved = model->config_.rope_interleaved;
  model->rope_.attention_scaling = freqs.attention_scaling;
  return model;
}

namespace {

// Stacks host matrices (or vectors) along dimension 0, in the parts' dtype when they agree, else f32.
absl::StatusOr<Tensor> ConcatRows(const std::vector<Tensor>& parts) {
  DType dtype = parts[0].dtype();
  int64_t rows = 0;
  for (const Tensor& p : parts) {
    if (p.ndim() != parts[0].ndim() || (p.ndim() == 2 && p.dim(1) != parts[0].dim(1))) {
      return absl::InvalidArgumentError("fused projections disagree on their input size");
    }
    if (p.dtype() != dtype) dtype = DType::kF32;
    rows += p.dim(0);
  }
  Shape shape = parts[0].shape();
  shape[0] = rows;
  Tensor out = Tensor::HostEmpty(dtype, shape);
  char* dst = static_cast<char*>(out.data());
  for (const Tensor& p : parts) {
    if (p.dtype() == dtype) {
      std::memcpy(dst, p.data(), p.nbytes());
    } else {
      ConvertToF32(p.data(), p.dtype(), reinterpret_cast<float*>(dst), p.numel());
    }
    dst += p.numel() * DTypeSize(dtype);
  }
  return out;
}

// Columns [begin, begin + count) of a host matrix [rows, cols] (a copy).
absl::StatusOr<Tensor> SliceColumns(const Tensor& t, int64_t begin, int64_t count) {
  if (t.ndim() != 2 || begin + count > t.dim(1) || !IsFloating(t.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: cannot take columns [", begin, ", ",
                                                   begin + count, ") of ", t.DebugString()));
  }
  const size_t es = DTypeSize(t.dtype());
  Tensor out = Tensor::HostEmpty(t.dtype(), {t.dim(0), count});
  for (int64_t r = 0; r < t.dim(0); ++r) {
    std::memcpy(static_cast<char*>(out.data()) + r * count * es,
                static_cast<const char*>(t.data()) + (r * t.dim(1) + begin) * es, count * es);
  }
  return out;
}

}  // namespace

absl::Status Transformer::LoadWeights(const WeightSource& weights, const LoadProgress& progress) {
  const ModelConfig& c = config_;
  // Each destination tensor is filled from one or more checkpoint tensors (stacked by rows).
  // Under tensor parallelism each part may be a slice of its checkpoint tensor: rows (column-parallel
  // projections and their biases) or columns (row-parallel ones) [begin, begin + count).
  struct Slice {
    enum Kind { kWhole, kRows, kColumns } kind = kWhole;
    int64_t begin = 0, count = 0;
  };
  struct Wanted {
    std::vector<std::string> names;
    Tensor* dst;
    std::vector<Slice> slices = {};  // per name; empty: every part whole
  };
  const bool sharded = tp_.size > 1;
  const int64_t q_rows = c.q_dim(), kv_rows = c.kv_dim(), ff = c.intermediate_size;  // the rank's
  const Slice q_slice{Slice::kRows, tp_.rank * q_rows, q_rows}, kv_slice{Slice::kRows, tp_.rank * kv_rows, kv_rows};
  const Slice ff_slice{Slice::kRows, tp_.rank * ff, ff};
  auto shard = [sharded](std::initializer_list<Slice> s) {
    return sharded ? std::vector<Slice>(s) : std::vector<Slice>{};
  };
  std::vector<Wanted> wanted;
  wanted.push_back({{"model.embed_tokens.weight"}, &embed_});
  layers_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& w = layers_[l];
    auto names = [l](std::initializer_list<const char*> suffixes) {
      std::vector<std::string> out;
      for (const char* s : suffixes) out.push_back(LayerName(l, s));
      return out;
    };
    wanted.push_back({names({"input_layernorm.weight"}), &w.input_norm});
    wanted.push_back({names({"post_attention_layernorm.weight"}), &w.post_attention_norm});
    wanted.push_back({names({"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"}),
                      &w.w_qkv, shard({q_slice, kv_slice, kv_slice})});
    wanted.push_back({names({"self_attn.o_proj.weight"}), &w.wo,
                      shard({{Slice::kColumns, tp_.rank * q_rows, q_rows}})});
    wanted.push_back({names({"mlp.gate_proj.weight", "mlp.up_proj.weight"}), &w.w_gate_up,
                      shard({ff_slice, ff_slice})});
    wanted.push_back({names({"mlp.down_proj.weight"}), &w.w_down, shard({{Slice::kColumns, tp_.rank * ff, ff}})});
    if (c.attention_bias) {
      wanted.push_back({names({"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}),
                        &w.b_qkv, shard({q_slice, kv_slice, kv_slice})});
    }
    // The row-parallel biases are added once, by rank 0, before the all-reduce.
    if (c.o_proj_bias && tp_.rank == 0) wanted.push_back({names({"self_attn.o_proj.bias"}), &w.b_o});
    if (c.mlp_bias) {
      wanted.push_back({names({"mlp.gate_proj.bias", "mlp.up_proj.bias"}), &w.b_gate_up, shard({ff_slice, ff_slice})});
      if (tp_.rank == 0) wanted.push_back({names({"mlp.down_proj.bias"}), &w.b_down});
    }
    if (c.qk_norm) {
      wanted.push_back({names({"self_attn.q_norm.weight"}), &w.q_norm});
      wanted.push_back({names({"self_attn.k_norm.weight"}), &w.k_norm});
    }
  }
  wanted.push_back({{"model.norm.weight"}, &final_norm_});
  if (!c.tie_word_embeddings) wanted.push_back({{"lm_head.weight"}, &lm_head_});

  // Sizes first (no data is read), then one destination at a time: fetch its parts, upload, drop them.
  // A dequantizing source (GGUF) returns fresh f32 copies, so holding every tensor before uploading any
  // would need the whole model in f32 on the host at once.
  int64_t total = 0, done = 0;
  std::vector<int64_t> stored(wanted.size(), 0);
  for (size_t i = 0; i < wanted.size(); ++i) {
    for (const std::string& name : wanted[i].names) {
      ASSIGN_OR_RETURN(WeightInfo info, weights.Info(name));
      stored[i] += static_cast<int64_t>(info.stored_bytes);
    }
    total += stored[i];
  }
  for (size_t i = 0; i < wanted.size(); ++i) {
    std::vector<Tensor> host;
    for (size_t j = 0; j < wanted[i].names.size(); ++j) {
      ASSIGN_OR_RETURN(Tensor t, weights.Get(wanted[i].names[j]));
      if (!wanted[i].slices.empty()) {
        const Slice& sl = wanted[i].slices[j];
        if (sl.kind == Slice::kRows) {
          if (t.ndim() < 1 || sl.begin + sl.count > t.dim(0)) {
            return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: ", wanted[i].names[j], " ",
                                                           t.DebugString(), " has no rows [", sl.begin, ", ",
                                                           sl.begin + sl.count, ")"));
          }
          t = t.Rows(sl.begin, sl.begin + sl.count);  // a view
        } else if (sl.kind == Slice::kColumns) {
          ASSIGN_OR_RETURN(t, SliceColumns(t, sl.begin, sl.count));
        }
      }
      host.push_back(std::move(t));
    }
    Tensor src = host[0];
    if (host.size() > 1) {
      ASSIGN_OR_RETURN(src, ConcatRows(host));
      host.clear();  // the stacked copy is all that is needed now
    }
    // Matrices may stay in a narrower dtype (bf16 on the CPU); norms and biases use the compute dtype.
    const DType dtype = src.ndim() == 2 ? backend_->weight_dtype(src.dtype()) : backend_->compute_dtype();
    auto t = backend_->ToDevice(src, dtype, MemoryKind::kWeights);
    if (!t.ok()) {
      return absl::Status(t.status().code(), absl::StrCat("loading ", wanted[i].names[0], ": ",
                                                          t.status().message()));
    }
    *wanted[i].dst = *std::move(t);
    done += stored[i];  // `host` and `src` (views, dequantized or stacked copies) go out of scope here
    if (progress) progress(done, total);
  }
  if (c.tie_word_embeddings) lm_head_ = embed_;
  SPC_LOG(INFO) << "weights loaded" << Kv("tensors", wanted.size()) << Kv("bytes", total)
                << Kv("backend", backend_->name());
  return absl::OkStatus();
}

absl::Status Transformer::SplitColumns(const Tensor& fused, std::initializer_list<int64_t> widths,
                                       std::initializer_list<Tensor*> parts) const {
  const int64_t n = fused.dim(0);
  const size_t es = DTypeSize(fused.dtype());
  int64_t begin = 0;
  auto part = parts.begin();
  for (int64_t width : widths) {
    if (n == 1) {
      // One row: each column range is contiguous, so a view avoids the copy.
      **part = Tensor(static_cast<char*>(fused.data()) + begin * es, fused.dtype(), {1, width}, fused.device(),
                      fused.storage());
    } else {
      ASSIGN_OR_RETURN(**part, backend_->Alloc(fused.dtype(), {n, width}, MemoryKind::kWorkspace));
      RETURN_IF_ERROR(backend_->CopyColumns(fused, begin, *part));
    }
    begin += width;
    ++part;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SequenceKv>> Transformer::AllocateKv(int32_t capacity) const {
  if (capacity <= 0) return absl::InvalidArgumentError("KV capacity must be positive");
  auto kv = std::make_unique<SequenceKv>();
  kv->capacity = capacity;
  const Shape shape{config_.num_key_value_heads, capacity, config_.head_dim};
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    ASSIGN_OR_RETURN(Tensor k, backend_->Alloc(backend_->compute_dtype(), shape, MemoryKind::kKvCache));
    ASSIGN_OR_RETURN(Tensor v, backend_->Alloc(backend_->compute_dtype(), shape, MemoryKind::kKvCache));
    kv->k.push_back(std::move(k));
    kv->v.push_back(std::move(v));
  }
  return kv;
}

int64_t Transformer::KvBytesPerToken() const {
  return 2 * config_.num_hidden_layers * config_.kv_dim() *
         static_cast<int64_t>(DTypeSize(backend_->compute_dtype()));
}

absl::Status Transformer::Layer(int l, int64_t n, Tensor& residual, Tensor& h, const Tensor& positions,
                                bool offloaded, const SparseForward* sparse) {
  const ModelConfig& c = config_;
  const LayerWeights& w = layers_[l];
  Backend& b = *backend_;
  const DType dt = b.compute_dtype();
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, hd = c.head_dim;
  ASSIGN_OR_RETURN(Tensor qkv, b.Alloc(dt, {n, (nh + 2 * nkv) * hd}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(b.Linear(h, w.w_qkv, w.b_qkv.empty() ? nullptr : &w.b_qkv, &qkv));
  Tensor q, k, v;
  RETURN_IF_ERROR(SplitColumns(qkv, {nh * hd, nkv * hd, nkv * hd}, {&q, &k, &v}));
  ASSIGN_OR_RETURN(Tensor q3, q.Reshape({n, nh, hd}));
  ASSIGN_OR_RETURN(Tensor k3, k.Reshape({n, nkv, hd}));
  ASSIGN_OR_RETURN(Tensor v3, v.Reshape({n, nkv, hd}));
  if (c.qk_norm) {
    ASSIGN_OR_RETURN(Tensor qr, q.Reshape({n * nh, hd}));
    ASSIGN_OR_RETURN(Tensor kr, k.Reshape({n * nkv, hd}));
    RETURN_IF_ERROR(b.RmsNorm(qr, w.q_norm, static_cast<float>(c.rms_norm_eps), &qr));
    RETURN_IF_ERROR(b.RmsNorm(kr, w.k_norm, static_cast<float>(c.rms_norm_eps), &kr));
  }
  if (!offloaded) {
    // RoPE of q and k and the append in one op (one kernel on CUDA; q and k stay rotated for the attention).
    RETURN_IF_ERROR(b.RopeKvAppend(l, &q3, &k3, v3, positions, rope_));
  } else {
    // The rotation (one launch at one token: q and k are adjacent in qkv), then the host copy's append.
    RETURN_IF_ERROR(b.RopeQk(&q3, &k3, positions, rope_));
    RETURN_IF_ERROR(b.KvAppendHost(l, k3, v3));
  }
  ASSIGN_OR_RETURN(Tensor attn, b.Alloc(dt, {n, nh, hd}, MemoryKind::kWorkspace));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (sparse != nullptr && !sparse->dense_attention && (offloaded || !sparse->dense_resident_layers)) {
    if (sparse->layer_selection != nullptr) RETURN_IF_ERROR(b.SelectLayerIndexSets(l, q3, *sparse->layer_selection));
    if (sparse->recall_lse != nullptr) {
      const Tensor& r = *sparse->recall_lse;  // [n_layers, n_seqs, n_heads, 2]
      const int64_t per_layer = r.numel() / r.dim(0);
      Tensor lse(static_cast<char*>(r.data()) + l * per_layer * DTypeSize(r.dtype()), r.dtype(), {n, nh, 2},
                 r.device(), r.storage());
      RETURN_IF_ERROR(b.AttentionRecall(l, q3, scale, &lse));
    }
    RETURN_IF_ERROR(b.SparseAttention(l, q3, k3, v3, scale, &attn));
  } else {
    RETURN_IF_ERROR(b.Attention(l, q3, scale, &attn));
  }
  ASSIGN_OR_RETURN(Tensor attn2, attn.Reshape({n, nh * hd}));
  ASSIGN_OR_RETURN(Tensor o, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
  auto bias = [](const Tensor& t) { return t.empty() ? nullptr : &t; };
  RETURN_IF_ERROR(b.Linear(attn2, w.wo, bias(w.b_o), &o));
  if (tp_.size > 1) RETURN_IF_ERROR(tp_.comm->AllReduceSum(&o));  // the heads' partial sums
  const float eps = static_cast<float>(c.rms_norm_eps);
  RETURN_IF_ERROR(b.AddRmsNorm(&residual, o, w.post_attention_norm, eps, &h));

  // Gate/up projection and SwiGLU in one op where the backend has it (small batches on CUDA, no bias), else two.
  ASSIGN_OR_RETURN(Tensor act, b.Alloc(dt, {n, c.intermediate_size}, MemoryKind::kWorkspace));
  absl::Status fused = w.b_gate_up.empty() ? b.LinearSwiGlu(h, w.w_gate_up, &act)
                                           : absl::UnimplementedError("gate/up bias");
  if (absl::IsUnimplemented(fused)) {
    ASSIGN_OR_RETURN(Tensor gate_up, b.Alloc(dt, {n, 2 * c.intermediate_size}, MemoryKind::kWorkspace));
    RETURN_IF_ERROR(b.Linear(h, w.w_gate_up, bias(w.b_gate_up), &gate_up));
    Tensor gate, up;
    RETURN_IF_ERROR(SplitColumns(gate_up, {c.intermediate_size, c.intermediate_size}, {&gate, &up}));
    RETURN_IF_ERROR(b.SwiGlu(gate, up, &act));
  } else {
    RETURN_IF_ERROR(fused);
  }
  RETURN_IF_ERROR(b.Linear(act, w.w_down, bias(w.b_down), &o));
  if (tp_.size > 1) RETURN_IF_ERROR(tp_.comm->AllReduceSum(&o));  // the intermediate ranges' partial sums
  const Tensor& next_norm = l + 1 < c.num_hidden_layers ? layers_[l + 1].input_norm : final_norm_;
  return b.AddRmsNorm(&residual, o, next_norm, eps, &h);
}

AttentionWorkspaceShape Transformer::AttentionShape(int64_t n_tokens, int64_t n_seqs) const {
  const ModelConfig& c = config_;
  AttentionWorkspaceShape a;
  a.max_seqs = static_cast<int32_t>(std::max<int64_t>(1, n_seqs));
  a.max_tokens = static_cast<int32_t>(std::max<int64_t>(n_tokens, a.max_seqs));
  a.n_layers = static_cast<int32_t>(c.num_hidden_layers);
  a.n_heads = static_cast<int32_t>(c.num_attention_heads);
  a.n_kv_heads = static_cast<int32_t>(c.num_key_value_heads);
  a.head_dim = static_cast<int32_t>(c.head_dim);
  return a;
}

int64_t Transformer::ForwardWorkspaceBytes(int64_t n, int64_t n_out, bool attention_buffers) const {
  const ModelConfig& c = config_;
  const int64_t es = static_cast<int64_t>(DTypeSize(backend_->compute_dtype()));
  auto t = [](int64_t bytes) { return AllocationBoundBytes(bytes); };
  // ForwardDevice: ids, positions, residual, h (live through every layer).
  const int64_t outer = 2 * t(n * 4) + 2 * t(n * c.hidden_size * es);
  // Layer: qkv and its q, k, v copies (SplitColumns), attn, o, act, gate_up and its gate, up copies.
  const int64_t layer = t(n * (c.q_dim() + 2 * c.kv_dim()) * es) + t(n * c.q_dim() * es) + 2 * t(n * c.kv_dim() * es) +
                        t(n * c.q_dim() * es) + t(n * c.hidden_size * es) + t(n * c.intermediate_size * es) +
                        t(n * 2 * c.intermediate_size * es) + 2 * t(n * c.intermediate_size * es);
  // After the layers: the last rows' indices and hidden states, the f32 logits.
  const int64_t tail = t(n_out * 4) + t(n_out * c.hidden_size * es) + t(n_out * c.vocab_size * 4);
  // The attention's own buffers stay allocated between steps (split-K partials, batch metadata).
  const int64_t attention = attention_buffers ? backend_->AttentionWorkspaceBytes(AttentionShape(n, n_out)) : 0;
  return outer + std::max(layer, tail) + attention;
}

absl::Status Transformer::IssueElasticLoads(const SparseForward& sparse) {
  // Consecutive layers with the same list go together (the backend may gather them at once).
  const std::vector<const CopyList*>& lists = sparse.layer_copies;
  for (size_t l = 0; l < lists.size();) {
    size_t end = l + 1;
    while (lists[l] != nullptr && end < lists.size() && lists[end] == lists[l]) ++end;
    if (lists[l] != nullptr) {
      RETURN_IF_ERROR(backend_->ElasticLoadLayers(static_cast<int>(l), static_cast<int>(end - l), *lists[l],
                                                  sparse.counters));
    }
    l = end;
  }
  return absl::OkStatus();
}

absl::Status Transformer::BeginOffloadedLayers(const SparseForward* sparse) {
  if (sparse == nullptr || !sparse->before_offloaded) return absl::OkStatus();
  RETURN_IF_ERROR(sparse->before_offloaded());
  if (!sparse->dense_attention) RETURN_IF_ERROR(backend_->PrepareSparseDecode(sparse->desc));
  return IssueElasticLoads(*sparse);
}

absl::Status Transformer::Forward(std::span<const ForwardSeq> seqs, bool all_tokens, Tensor* logits) {
  return Forward(seqs, all_tokens, logits, nullptr, nullptr);
}

absl::Status Transformer::Capture(int l, int64_t n, const Tensor& residual, HiddenCapture* capture) const {
  const int64_t d = config_.hidden_size, width = static_cast<int64_t>(capture->layers.size()) * d;
  if (capture->on_device) {
    const DType dt = backend_->compute_dtype();
    for (size_t j = 0; j < capture->layers.size(); ++j) {
      if (capture->layers[j] != l) continue;
      if (capture->out.shape() != Shape{n, width} || capture->out.dtype() != dt) {
        ASSIGN_OR_RETURN(capture->out, backend_->Alloc(dt, {n, width}, MemoryKind::kWorkspace));
      }
      RETURN_IF_ERROR(backend_->CopyToColumns(residual, static_cast<int64_t>(j) * d, &capture->out));
    }
    return absl::OkStatus();
  }
  for (size_t j = 0; j < capture->layers.size(); ++j) {
    if (capture->layers[j] != l) continue;
    Tensor host = Tensor::HostEmpty(residual.dtype(), {n, d});
    RETURN_IF_ERROR(backend_->ToHost(residual, &host));
    for (int64_t i = 0; i < n; ++i) {
      ConvertToF32(static_cast<const char*>(host.data()) + i * d * DTypeSize(host.dtype()), host.dtype(),
                   capture->out.as<float>() + i * width + j * d, d);
    }
  }
  return absl::OkStatus();
}

absl::Status Transformer::Forward(std::span<const ForwardSeq> seqs, bool all_tokens, Tensor* logits,
                                  const SparseForward* sparse, HiddenCapture* capture) {
  int64_t n_tokens = 0;
  for (const ForwardSeq& s : seqs) n_tokens += static_cast<int64_t>(s.tokens.size());
  const int64_t n_out = all_tokens ? n_tokens : static_cast<int64_t>(seqs.size());
  if (logits->dtype() != DType::kF32 || logits->numel() != n_out * config_.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("forward: logits buffer ", logits->DebugString(),
                                                   ", expected f32[", n_out, ", ", config_.vocab_size, "]"));
  }
  ASSIGN_OR_RETURN(Tensor d_logits, ForwardDevice(seqs, all_tokens, sparse, capture));
  return backend_->ToHost(d_logits, logits);
}

absl::StatusOr<Tensor> Transformer::ForwardDevice(std::span<const ForwardSeq> seqs, bool all_tokens,
                                                  const SparseForward* sparse, HiddenCapture* capture) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  BatchDesc batch;
  std::vector<int32_t> ids, positions, last_rows;
  for (const ForwardSeq& s : seqs) {
    if (s.kv == nullptr || s.tokens.empty()) {
      return absl::InvalidArgumentError("forward: every sequence needs KV storage and at least one token");
    }
    if (s.past_len + static_cast<int64_t>(s.tokens.size()) > s.kv->capacity) {
      return absl::OutOfRangeError(absl::StrCat("forward: ", s.past_len + s.tokens.size(),
                                                " tokens exceed the sequence's KV capacity ", s.kv->capacity));
    }
    batch.seqs.push_back({static_cast<int32_t>(ids.size()), static_cast<int32_t>(s.tokens.size()), s.past_len});
    batch.kv.push_back(s.kv);
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
        return absl::OutOfRangeError(absl::StrCat("token id ", s.tokens[i], " outside the vocabulary [0, ",
                                                  c.vocab_size, ")"));
      }
      ids.push_back(s.tokens[i]);
      positions.push_back(s.past_len + static_cast<int32_t>(i));
    }
    last_rows.push_back(static_cast<int32_t>(ids.size()) - 1);
  }
  const int64_t n = static_cast<int64_t>(ids.size());
  batch.n_tokens = static_cast<int32_t>(n);
  const int64_t n_out = all_tokens ? n : static_cast<int64_t>(seqs.size());
  if (seqs.empty()) return absl::InvalidArgumentError("forward: no sequences");
  RETURN_IF_ERROR(b.PrepareBatch(batch));
  const int graph_layers = GraphableLayers(seqs, n, sparse, capture);
  if (graph_layers > 0 && sparse == nullptr && capture == nullptr) return DecodeStep(ids, positions);
  if (sparse != nullptr) {
    for (const ForwardSeq& s : seqs) {
      if (s.tokens.size() != 1) return absl::InvalidArgumentError("sparse forward: every sequence decodes one token");
    }
    if (!sparse->dense_attention) RETURN_IF_ERROR(b.PrepareSparseDecode(sparse->desc));
    // Elastic loads of every offloaded layer go first: on CUDA they run on the copy stream, hidden behind
    // the compute of the layers before (each SparseAttention waits only on its own layer's event). With a
    // before_offloaded callback they go once the resident layers are enqueued (BeginOffloadedLayers).
    if (!sparse->before_offloaded) RETURN_IF_ERROR(IssueElasticLoads(*sparse));
  }
  if (capture != nullptr) {
    for (int32_t l : capture->layers) {
      if (l < 0 || l > c.num_hidden_layers) {
        return absl::InvalidArgumentError(absl::StrCat("hidden capture: layer ", l, " outside [0, ",
                                                       c.num_hidden_layers, "]"));
      }
    }
    const int64_t width = static_cast<int64_t>(capture->layers.size()) * c.hidden_size;
    if (!capture->on_device) capture->out = Tensor::HostEmpty(DType::kF32, {n, width});
  }
  if (graph_layers > 0) return DecodeStep(ids, positions, sparse, capture, graph_layers);

  const DType dt = b.compute_dtype();
  ASSIGN_OR_RETURN(Tensor d_ids, b.ToDevice(Tensor(ids.data(), DType::kI32, {n}), DType::kI32,
                                            MemoryKind::kWorkspace));
  ASSIGN_OR_RETURN(Tensor d_pos, b.ToDevice(Tensor(positions.data(), DType::kI32, {n}), DType::kI32,
                                            MemoryKind::kWorkspace));
  ASSIGN_OR_RETURN(Tensor residual, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
  ASSIGN_OR_RETURN(Tensor h, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(b.Embedding(embed_, d_ids, &residual));
  const float eps = static_cast<float>(c.rms_norm_eps);
  RETURN_IF_ERROR(b.RmsNorm(residual, layers_[0].input_norm, eps, &h));
  bool begun = false;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    if (capture != nullptr) RETURN_IF_ERROR(Capture(l, n, residual, capture));
    const bool offloaded = seqs.front().kv->offloaded(l);
    if (offloaded && !begun) {
      RETURN_IF_ERROR(BeginOffloadedLayers(sparse));
      begun = true;
    }
    RETURN_IF_ERROR(Layer(l, n, residual, h, d_pos, offloaded, sparse));
  }
  if (capture != nullptr) RETURN_IF_ERROR(Capture(c.num_hidden_layers, n, residual, capture));

  Tensor rows = h;
  if (!all_tokens) {
    ASSIGN_OR_RETURN(Tensor d_last, b.ToDevice(Tensor(last_rows.data(), DType::kI32, {n_out}), DType::kI32,
                                               MemoryKind::kWorkspace));
    ASSIGN_OR_RETURN(rows, b.Alloc(dt, {n_out, c.hidden_size}, MemoryKind::kWorkspace));
    RETURN_IF_ERROR(b.Embedding(h, d_last, &rows));
  }
  ASSIGN_OR_RETURN(Tensor d_logits, b.Alloc(DType::kF32, {n_out, c.vocab_size}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(b.Linear(rows, lm_head_, nullptr, &d_logits));
  return d_logits;
}

}  // namespace specontext
