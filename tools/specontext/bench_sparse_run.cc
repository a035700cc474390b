// The harness of `specontext bench --sparse` (bench_sparse_run.h). Floor of a step: HBM bytes (weights, the
// sparse KV every layer reads: R·(min(B, S)+1) rows per KV head, resident layers from the full KV and offloaded
// ones from their slot buffers, the retrieval head's weights and K cache) over the device copy bandwidth, and
// PCIe bytes (elastic loads measured, new tokens' KV to the host copies of offloaded layers) over the measured
// pinned host bandwidth. The copies run on their own stream beside the compute, so the floor is the larger of
// the two (max, not sum).
#include "tools/specontext/bench_sparse_run.h"

#include <algorithm>
#include <fstream>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/index_sets.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

using Json = BenchJson;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Σ |S_now ∩ S_last| and Σ |S_now| over the sets of two consecutive steps (ascending positions per set).
void AddSetOverlap(const IndexSets& last, const IndexSets& now, double* kept, double* total) {
  if (last.n_sets() != now.n_sets() || now.indptr.empty() || last.indptr.empty()) return;
  for (int32_t s = 0; s < now.n_sets(); ++s) {
    std::span<const int32_t> b = now.SetPositions(s);
    *kept += static_cast<double>(SortedIntersectionSize(last.SetPositions(s), b));
    *total += static_cast<double>(b.size());
  }
}

int64_t HostMemAvailable() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

}  // namespace

absl::StatusOr<Bandwidths> MeasureBandwidths(Backend& b, bool pcie) {
  Bandwidths bw;
  // 1 GiB buffers as the dense bench, smaller under a tight device limit (the figure then understates the
  // bandwidth a little: --hbm-gbs overrides it).
  // (64 MiB on the CPU backend, where the figure only scales the floor of a functional run.)
  const int64_t cap = b.device() == DeviceKind::kCpu ? int64_t{16} << 20 : int64_t{256} << 20;
  const int64_t n = std::max<int64_t>(1024, std::min<int64_t>(cap, b.available_bytes() / 16));
  ASSIGN_OR_RETURN(Tensor src, b.Alloc(DType::kF32, {n}, MemoryKind::kOther));
  ASSIGN_OR_RETURN(Tensor dst, b.Alloc(DType::kF32, {n}, MemoryKind::kOther));
  RETURN_IF_ERROR(b.Zero(&src));
  Tensor host;
  if (pcie) {
    ASSIGN_OR_RETURN(host, b.AllocPinnedHost(DType::kF32, {n}, MemoryKind::kOther));
  }
  // Each timed device copy batch moves at least 1 GiB: a single copy of a buffer shrunk by a tight limit
  // (94 MB under 4 GiB with a 1B model loaded) took ~65 us, and the launch and the wait on the host clock
  // added 5-10% to it, so the floor came out 5-10% high (2730 against 2900 GB/s in one device call).
  const int batch = static_cast<int>(std::max<int64_t>(1, (int64_t{1} << 30) / src.nbytes()));
  for (int i = 0; i < 6; ++i) {
    RETURN_IF_ERROR(b.Synchronize());
    absl::Time t0 = absl::Now();
    for (int k = 0; k < batch; ++k) RETURN_IF_ERROR(b.CopyDevice(src, &dst));
    RETURN_IF_ERROR(b.Synchronize());
    if (i > 0) bw.hbm = std::max(bw.hbm, 2.0 * batch * src.nbytes() / absl::ToDoubleSeconds(absl::Now() - t0));
    if (!pcie) continue;
    t0 = absl::Now();
    RETURN_IF_ERROR(b.CopyToPinnedHost(src, &host));
    if (i > 0) bw.pcie = std::max(bw.pcie, src.nbytes() / absl::ToDoubleSeconds(absl::Now() - t0));
  }
  return bw;
}

// Builds the decoder, checks that the host can hold what the planner will offload at R × capacity tokens,
// and allocates the sequences (device KV grows as they do; the planner moves layers as the rows in flight
// cross its thresholds).
// Errors (memory) are returned as statuses: the caller prints them as JSON error lines.
absl::Status SparseBenchRun::Allocate(int64_t requests, int32_t capacity) {
  const absl::Time t0 = absl::Now();
  Transformer& m = *s_.rt->model;
  const ModelConfig& c = m.config();
  Backend& b = *m.backend();
  const int64_t kv_tok = m.KvBytesPerToken();
  if (s_.dense) {
    const int64_t need = requests * capacity * kv_tok;
    if (need > b.available_bytes()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "dense KV does not fit the GPU: ", requests, " x ", capacity, " tokens need ", need >> 20, " MiB, ",
          b.available_bytes() >> 20, " MiB free; dense decoding at this size would need host offload"));
    }
  } else {
    // The run's sequences are its longest: the planner's prefill staging reserve is sized for them.
    SparseOptions o = s_.options;
    o.max_context = static_cast<int32_t>(
        std::min<int64_t>(std::max<int64_t>(capacity, o.budget), c.max_position_embeddings));
    ASSIGN_OR_RETURN(dec_, SparseDecoder::Create(&m, s_.head, o));
    if (dec_->planner().has_value()) {
      absl::StatusOr<int32_t> gpu = dec_->planner()->GpuLayersFor(requests * capacity, requests);
      if (!gpu.ok()) {
        return absl::ResourceExhaustedError(absl::StrCat("planner: ", gpu.status().message()));
      }
      gpu_layers_at_capacity_ = *gpu;
      const std::vector<int64_t> host_blocks = HostAllocationBytes(b, c, capacity, *gpu);  // per sequence
      int64_t host_need = 0;
      for (const int64_t bytes : host_blocks) host_need += bytes * requests;
      const int64_t host_avail = HostMemAvailable();
      if (host_avail > 0 && host_need > host_avail - (int64_t{4} << 30)) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "host memory: ", c.num_hidden_layers - *gpu, " offloaded layers of ", requests, " x ", capacity,
            " tokens need ", host_need >> 20, " MiB of pinned KV, ", host_avail >> 20,
            " MiB available (4 GiB kept free)"));
      }
      // Pin the host copies of the layers the planner will offload now, as a server would at its start: the
      // layer moves during the run then pin nothing (alloc_seconds, not generation time).
      // The blocks the tiers will take (K and V, an interleaved pair or a layer group: SequenceKv "Host layout").
      absl::flat_hash_map<int64_t, int64_t> blocks;  // bytes -> count per sequence
      for (const int64_t bytes : host_blocks) ++blocks[bytes];
      for (const auto& [bytes, count] : blocks) RETURN_IF_ERROR(dec_->host_cache().Reserve(b, bytes, count * requests));
      if (s_.options.kv_grow_rows == 0) RETURN_IF_ERROR(dec_->OffloadLayers(*gpu));  // KV at capacity now
    }
  }
  for (int64_t i = 0; i < requests; ++i) {
    absl::StatusOr<std::unique_ptr<SequenceKv>> kv =
        s_.dense ? m.AllocateKv(capacity) : dec_->AllocateKv(i + 1, capacity, s_.options.budget);
    if (!kv.ok()) {
      return absl::Status(kv.status().code(), absl::StrCat("allocating sequence ", i, " of ", requests, " (",
                                                           capacity, " tokens): ", kv.status().message()));
    }
    kv_.push_back(*std::move(kv));
  }
  capacity_ = capacity;
  alloc_seconds_ = absl::ToDoubleSeconds(absl::Now() - t0);
  return absl::OkStatus();
}

// Setup costs of this run so far (where a long run spends its time before the first point).
Json SparseBenchRun::Progress() const {
  Json j = Json::object();
  j["requests"] = kv_.size();
  j["context"] = len_;
  j["capacity"] = capacity_;
  j["gpu_layers_at_capacity"] = gpu_layers_at_capacity_;
  // This run's planner (sized for its capacity: SparseOptions::max_context), not the setup line's.
  if (dec_ != nullptr && dec_->planner().has_value()) j["planner_fixed_bytes"] = dec_->planner()->fixed_bytes();
  if (dec_ != nullptr) j["gpu_layers"] = dec_->gpu_layers();
  j["alloc_seconds"] = alloc_seconds_;
  j["fill_seconds"] = fill_seconds_;
  if (dec_ != nullptr) j["host_pinned_bytes"] = dec_->stats().host_kv_bytes;
  return j;
}

// Prefills every sequence up to `to` tokens (random ids), one sequence at a time.
absl::Status SparseBenchRun::Extend(int32_t to) {
  const int64_t vocab = s_.rt->model->config().vocab_size;
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
  const absl::Time t0 = absl::Now();
  for (size_t i = 0; i < kv_.size(); ++i) {
    for (int32_t pos = len_; pos < to; pos += static_cast<int32_t>(s_.chunk)) {
      const int32_t n = std::min<int32_t>(static_cast<int32_t>(s_.chunk), to - pos);
      std::vector<int32_t> ids(n);
      for (int32_t& t : ids) t = tok(rng_);
      ForwardSeq f{ids, pos, kv_[i].get()};
      RETURN_IF_ERROR(Forward({&f, 1}, i, &logits));
    }
  }
  if (to > len_) fill_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
  len_ = std::max(len_, to);
  return absl::OkStatus();
}

// Times warmup + steps decode steps at the current length; one JSON object with the figures.
absl::StatusOr<Json> SparseBenchRun::Measure() {
  Transformer& m = *s_.rt->model;
  const ModelConfig& c = m.config();
  Backend& b = *m.backend();
  const int64_t n = static_cast<int64_t>(kv_.size()), vocab = c.vocab_size;
  if (len_ + s_.warmup + s_.steps > capacity_) return absl::InternalError("measuring past the KV capacity");
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  Tensor logits = Tensor::HostEmpty(DType::kF32, {n, vocab});
  std::vector<int32_t> sampled(n);
  const int32_t context = len_;
  SparseEngineStats before;
  std::vector<double> times;
  IndexSets last_sets;  // the previous step's sets: the overlap of consecutive steps, offloaded or not
  double set_kept = 0, set_total = 0;
  int64_t last_sparse_steps = dec_ != nullptr ? dec_->stats().sparse_steps : 0;
  for (int64_t step = 0; step < s_.warmup + s_.steps; ++step) {
    std::vector<int32_t> ids(n);
    for (int32_t& t : ids) t = tok(rng_);
    std::vector<ForwardSeq> fwd;
    for (int64_t i = 0; i < n; ++i) fwd.push_back({std::span<const int32_t>(&ids[i], 1), len_, kv_[i].get()});
    if (step == s_.warmup && dec_ != nullptr) before = dec_->stats();
    const absl::Time t0 = absl::Now();
    if (b.device_sampling()) {
      RETURN_IF_ERROR(ForwardAndSampleOnDevice(fwd, &sampled));  // the engine's step: only ids come down
    } else {
      RETURN_IF_ERROR(Forward(fwd, -1, &logits));
    }
    if (step >= s_.warmup) times.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    ++len_;
    if (dec_ != nullptr) {
      // Only sparse steps make sets (a dense step, every past within its budget, leaves the last ones).
      const int64_t sparse_steps = dec_->stats().sparse_steps;
      if (sparse_steps == last_sparse_steps) {
        last_sets = IndexSets();
      } else {
        if (step >= s_.warmup) AddSetOverlap(last_sets, dec_->last_sets(), &set_kept, &set_total);
        last_sets = dec_->last_sets();
      }
      last_sparse_steps = sparse_steps;
    }
  }
  const double ms = Median(times), steps = static_cast<double>(s_.steps);
  Json j;
  j["attention"] = s_.dense ? "dense" : "sparse";
  j["requests"] = n;
  j["context"] = context;
  j["step_ms"] = ms;
  j["step_ms_min"] = *std::min_element(times.begin(), times.end());
  j["tokens_per_s"] = n * 1e3 / ms;
  const int64_t kv_tok = m.KvBytesPerToken(), kv_layer_tok = kv_tok / c.num_hidden_layers;
  const double weights = static_cast<double>(b.memory_report().bytes[static_cast<size_t>(MemoryKind::kWeights)]);
  double hbm = 0, pcie = 0;
  if (s_.dense) {
    hbm = weights + double(n) * context * kv_tok;
    j["gpu_layers"] = c.num_hidden_layers;
    j["offloaded_layers"] = 0;
    j["device_bytes"] = b.memory_report().total;
  } else {
    const SparseEngineStats st = dec_->stats();
    const ElasticCounters& e = st.elastic;
    const ElasticCounters& e0 = before.elastic;
    const double set_rows = double(e.set_rows - e0.set_rows), kept = double(e.kept_rows - e0.kept_rows);
    const double loaded = double(e.bytes_loaded - e0.bytes_loaded) / steps;
    const double full = double(e.bytes_full_reload - e0.bytes_full_reload) / steps;
    j["budget"] = s_.options.budget;
    j["synthetic_overlap"] = s_.synthetic_overlap;
    j["gpu_layers"] = st.gpu_layers;
    j["offloaded_layers"] = st.offloaded_layers;
    j["gpu_layers_at_capacity"] = gpu_layers_at_capacity_;
    j["kv_grows"] = st.kv_grows;
    j["sparse_steps"] = st.sparse_steps - before.sparse_steps;
    j["dense_steps"] = st.dense_steps - before.dense_steps;
    j["overlap"] = set_rows > 0 ? kept / set_rows : 1.0;  // elastic counters (offloaded layers only)
    j["set_overlap"] = set_total > 0 ? set_kept / set_total : 0.0;  // consecutive steps' index sets
    j["rows_loaded_per_step"] = double(e.rows_loaded - e0.rows_loaded) / steps;
    j["bytes_loaded_per_step"] = loaded;
    j["bytes_full_reload_per_step"] = full;
    j["loaded_vs_full_reload"] = full > 0 ? loaded / full : 0.0;
    j["captured_mass"] = st.last_captured_mass;
    const int64_t timed = e.copy_timed_loads - e0.copy_timed_loads;
    j["copy_timed_loads"] = timed;
    j["copy_ms_per_step"] = timed > 0 ? (e.copy_seconds - e0.copy_seconds) * 1e3 / steps : 0.0;
    j["copy_exposed_ms_per_step"] =
        timed > 0 ? (e.copy_exposed_seconds - e0.copy_exposed_seconds) * 1e3 / steps : 0.0;
    j["copy_hidden_ms_per_step"] =
        timed > 0 ? (e.copy_hidden_seconds() - e0.copy_hidden_seconds()) * 1e3 / steps : 0.0;
    j["device_bytes"] = st.device_bytes;
    j["host_pinned_bytes"] = st.host_kv_bytes;
    // Host wall time of the decoder's decode phases, ms per timed step (SparseStepSeconds; a phase that
    // waits for the device includes the wait: select the index-set download, forward the logits).
    const SparseStepSeconds& ds = st.decode_seconds;
    const SparseStepSeconds& d0 = before.decode_seconds;
    const double dsteps = static_cast<double>(ds.steps - d0.steps);
    auto per_step = [&](double now, double then) { return dsteps > 0 ? (now - then) * 1e3 / dsteps : 0.0; };
    j["decode_observe_ms"] = per_step(ds.observe, d0.observe);
    j["decode_select_ms"] = per_step(ds.select, d0.select);
    j["decode_synthetic_ms"] = per_step(ds.synthetic, d0.synthetic);
    j["decode_plan_ms"] = per_step(ds.plan, d0.plan);
    j["decode_forward_ms"] = per_step(ds.forward, d0.forward);
    j["decode_apply_ms"] = per_step(ds.apply, d0.apply);
    j["decode_total_ms"] = per_step(ds.total, d0.total);
    // Every layer reads min(B, S) + 1 rows per KV head (resident: from the full KV; offloaded: from
    // the slot buffer); the head reads its weights (not the shared embedding) and its K cache.
    const double rows = std::min<double>(s_.options.budget, context) + 1;
    const RetrievalHeadConfig& hc = s_.head->config();
    const double head_params =
        double(s_.head->parameter_count()) - (hc.own_embedding ? double(hc.attn.vocab_size) * hc.attn.hidden_size : 0);
    const double head_weights = head_params * 2;  // bf16
    const double head_cache = double(n) * context * s_.head->n_kv_heads() * s_.head->head_dim() * 2;
    hbm = weights + double(n) * rows * kv_tok + head_weights + head_cache;
    pcie = loaded + double(n) * st.offloaded_layers * kv_layer_tok;
    j["hbm_head_bytes"] = head_weights + head_cache;
  }
  const double hbm_ms = hbm / s_.bw.hbm * 1e3, pcie_ms = s_.bw.pcie > 0 ? pcie / s_.bw.pcie * 1e3 : 0;
  j["hbm_bytes"] = hbm;
  j["pcie_bytes"] = pcie;
  j["hbm_ms"] = hbm_ms;
  j["pcie_ms"] = pcie_ms;
  j["floor_ms"] = std::max(hbm_ms, pcie_ms);
  j["floor_rule"] = "max(hbm, pcie): copies overlap compute on their own stream";
  j["ratio_to_floor"] = ms / std::max(hbm_ms, pcie_ms);
  j["fill_seconds"] = fill_seconds_;
  j["alloc_seconds"] = alloc_seconds_;
  return j;
}

absl::Status SparseBenchRun::ForwardAndSampleOnDevice(std::span<const ForwardSeq> fwd, std::vector<int32_t>* ids) {
  Transformer& m = *s_.rt->model;
  absl::StatusOr<Tensor> logits;
  if (dec_ == nullptr) {
    logits = m.ForwardDevice(fwd, /*all_tokens=*/false);
  } else {
    std::vector<SparseStepSeq> seqs;
    for (size_t i = 0; i < fwd.size(); ++i) seqs.push_back({static_cast<uint64_t>(i) + 1, s_.options.budget});
    logits = dec_->ForwardDevice(fwd, seqs);
  }
  RETURN_IF_ERROR(logits.status());
  std::vector<TokenSampling> greedy(fwd.size());
  ids->resize(fwd.size());
  return m.backend()->SampleTokens(*logits, greedy, *ids);
}

absl::Status SparseBenchRun::Forward(std::span<const ForwardSeq> fwd, int64_t only, Tensor* logits) {
  if (dec_ == nullptr) return s_.rt->model->Forward(fwd, false, logits);
  std::vector<SparseStepSeq> seqs;
  for (size_t i = 0; i < fwd.size(); ++i) {
    seqs.push_back({static_cast<uint64_t>(only >= 0 ? only + 1 : int64_t(i) + 1), s_.options.budget});
  }
  return dec_->Forward(fwd, seqs, logits);
}

}  // namespace specontext
