// `specontext bench`: dense prefill throughput and decode step time over batch x context, each
// figure printed beside its floor (bytes the step must read / measured device copy bandwidth).
//
// Method: decode steps run B sequences whose caches already hold S tokens (zeroed KV: the step
// reads the same bytes whatever the values), one new token each; the time is the median wall time
// of Forward() (which includes metadata upload and the logits download) over --steps steps after
// warm-up, with and without CUDA graphs (--cuda-graphs both), and also with the logits kept on the
// device and greedy tokens picked there (sampled_step_ms: what the engine pays on CUDA). Prefill runs
// one prompt of P tokens in chunks of --prefill-chunk.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/cli/args.h"
#include "core/runtime/runtime.h"
#include "core/status_macros.h"
#include "tools/specontext/commands.h"

namespace specontext {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Device copy bandwidth over a 1 GiB buffer, best of 5, counting bytes read plus bytes written:
// the rate at which the memory moves bytes, so a step that must read N bytes takes at least N / bw.
absl::StatusOr<double> CopyBandwidth(Backend& b) {
  const int64_t n = int64_t{256} << 20;
  ASSIGN_OR_RETURN(Tensor src, b.Alloc(DType::kF32, {n}, MemoryKind::kOther));
  ASSIGN_OR_RETURN(Tensor dst, b.Alloc(DType::kF32, {n}, MemoryKind::kOther));
  RETURN_IF_ERROR(b.Zero(&src));
  double best = 0;
  for (int i = 0; i < 6; ++i) {
    RETURN_IF_ERROR(b.Synchronize());
    const absl::Time t0 = absl::Now();
    RETURN_IF_ERROR(b.CopyDevice(src, &dst));
    RETURN_IF_ERROR(b.Synchronize());
    const double s = absl::ToDoubleSeconds(absl::Now() - t0);
    if (i > 0) best = std::max(best, 2.0 * src.nbytes() / s);
  }
  return best;
}

struct Emitter {
  std::ofstream out;
  void Line(const std::string& json) {
    std::printf("%s\n", json.c_str());
    std::fflush(stdout);
    if (out.is_open()) out << json << "\n";
  }
};

struct DecodeTimes {
  double forward_ms = 0;  // Forward(): logits downloaded (what a host sampler pays)
  double sampled_ms = 0;  // ForwardDevice() + greedy Backend::SampleTokens (the engine on CUDA)
};

// Median step times over `steps` steps after 3 warm-up steps, each variant from position `ctx` on.
absl::StatusOr<DecodeTimes> TimeDecode(Transformer& model, const std::vector<std::unique_ptr<SequenceKv>>& kvs,
                                       int64_t ctx, int64_t steps) {
  Backend& b = *model.backend();
  const int64_t batch = static_cast<int64_t>(kvs.size());
  std::vector<int32_t> step_tokens(batch, 1), sampled(batch);
  Tensor logits = Tensor::HostEmpty(DType::kF32, {batch, model.config().vocab_size});
  std::vector<TokenSampling> greedy(batch);
  DecodeTimes out;
  for (int variant = 0; variant < 2; ++variant) {
    if (variant == 1 && !b.device_sampling()) break;
    std::vector<double> times;
    for (int64_t step = 0; step < steps + 3; ++step) {
      std::vector<ForwardSeq> seqs;
      for (int64_t i = 0; i < batch; ++i) {
        seqs.push_back({std::span<const int32_t>(&step_tokens[i], 1), static_cast<int32_t>(ctx + step), kvs[i].get()});
      }
      const absl::Time t0 = absl::Now();
      if (variant == 0) {
        RETURN_IF_ERROR(model.Forward(seqs, false, &logits));
      } else {
        ASSIGN_OR_RETURN(Tensor d_logits, model.ForwardDevice(seqs, false));
        RETURN_IF_ERROR(b.SampleTokens(d_logits, greedy, sampled));
      }
      if (step >= 3) times.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    }
    (variant == 0 ? out.forward_ms : out.sampled_ms) = Median(times);
  }
  return out;
}

absl::Status RunBench(const Args& args) {
  if (!args.Has("model")) return absl::InvalidArgumentError("--model is required");
  RuntimeOptions ro;
  ro.model_path = args.GetString("model");
  ro.backend = args.GetString("backend");
  ASSIGN_OR_RETURN(ro.gpu_memory_limit, args.GetBytes("gpu-memory-limit"));
  ro.show_progress = true;
  ASSIGN_OR_RETURN(std::vector<int64_t> batches, args.GetPositiveIntList("batch"));
  ASSIGN_OR_RETURN(std::vector<int64_t> contexts, args.GetPositiveIntList("context"));
  ASSIGN_OR_RETURN(std::vector<int64_t> prefills, args.GetPositiveIntList("prefill"));
  ASSIGN_OR_RETURN(int64_t steps, args.GetInt("steps"));
  ASSIGN_OR_RETURN(int64_t chunk, args.GetInt("prefill-chunk"));
  if (steps <= 0 || chunk <= 0) return absl::InvalidArgumentError("--steps and --prefill-chunk must be positive");
  const std::string graphs_flag = args.GetString("cuda-graphs");
  if (graphs_flag != "both" && graphs_flag != "true" && graphs_flag != "false") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda-graphs expects true, false or both, got \"", graphs_flag, "\""));
  }
  ro.cuda_graphs = graphs_flag != "false";
  ro.batch_invariant = args.GetBool("batch-invariant");
  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  Backend& b = *rt.backend;
  const bool graphs_default = b.step_graphs();
  std::vector<bool> graph_modes = {graphs_default};
  if (graphs_flag == "both" && graphs_default) graph_modes = {false, true};
  Transformer& model = *rt.model;
  const ModelConfig& c = model.config();
  Emitter emit;
  if (args.Has("out")) emit.out.open(args.GetString("out"), std::ios::app);

  ASSIGN_OR_RETURN(double bw, CopyBandwidth(b));
  const int64_t weight_bytes = b.memory_report().bytes[static_cast<size_t>(MemoryKind::kWeights)];
  const int64_t kv_token = model.KvBytesPerToken();
  emit.Line(absl::StrFormat(
      R"({"kind":"setup","backend":"%s","batch_invariant":%s,"model":"%s","layers":%d,"hidden":%d,"weight_bytes":%d,"kv_bytes_per_token":%d,"copy_bandwidth_gbs":%.1f})",
      b.name(), b.batch_invariant() ? "true" : "false", ro.model_path, c.num_hidden_layers, c.hidden_size, weight_bytes, kv_token, bw / 1e9));

  std::vector<int32_t> tokens;
  for (int64_t p : prefills) {
    tokens.assign(p, 0);
    for (int64_t i = 0; i < p; ++i) tokens[i] = static_cast<int32_t>((i * 7919) % c.vocab_size);
    auto kv = model.AllocateKv(static_cast<int32_t>(p));
    if (!kv.ok()) {
      emit.Line(absl::StrFormat(R"({"kind":"prefill","prompt":%d,"error":"%s"})", p, kv.status().message()));
      continue;
    }
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    std::vector<double> times;
    for (int rep = 0; rep < 3; ++rep) {
      const absl::Time t0 = absl::Now();
      for (int64_t pos = 0; pos < p; pos += chunk) {
        const int64_t n = std::min(chunk, p - pos);
        ForwardSeq s{std::span<const int32_t>(tokens.data() + pos, n), static_cast<int32_t>(pos), kv->get()};
        RETURN_IF_ERROR(model.Forward({&s, 1}, false, &logits));
      }
      times.push_back(absl::ToDoubleSeconds(absl::Now() - t0));
    }
    const double t = Median(times);
    const double flops = 2.0 * (weight_bytes / DTypeSize(b.compute_dtype())) * p +
                         2.0 * c.num_hidden_layers * c.q_dim() * double(p) * p;  // GEMMs + causal attention
    emit.Line(absl::StrFormat(R"({"kind":"prefill","prompt":%d,"seconds":%.4f,"tokens_per_s":%.1f,"tflops":%.1f})",
                              p, t, p / t, flops / t / 1e12));
  }

  for (int64_t batch : batches) {
    for (int64_t ctx : contexts) {
      std::vector<std::unique_ptr<SequenceKv>> kvs;
      absl::Status st;
      for (int64_t i = 0; i < batch && st.ok(); ++i) {
        auto kv = model.AllocateKv(static_cast<int32_t>(ctx + steps + 4));
        if (!kv.ok()) {
          st = kv.status();
          break;
        }
        for (int l = 0; l < c.num_hidden_layers && st.ok(); ++l) {
          st = b.Zero(&(*kv)->k[l]);
          if (st.ok()) st = b.Zero(&(*kv)->v[l]);
        }
        kvs.push_back(*std::move(kv));
      }
      if (!st.ok()) {
        emit.Line(absl::StrFormat(R"({"kind":"decode","batch":%d,"context":%d,"error":"%s"})", batch, ctx,
                                  st.message()));
        continue;
      }
      const double bytes = weight_bytes + double(batch) * ctx * kv_token;
      const double floor_ms = bytes / bw * 1e3;  // bw: bytes moved (read + written) per second by a copy
      for (bool graphs : graph_modes) {
        b.set_step_graphs(graphs);
        ASSIGN_OR_RETURN(DecodeTimes t, TimeDecode(model, kvs, ctx, steps));
        emit.Line(absl::StrFormat(
            R"({"kind":"decode","batch":%d,"context":%d,"graphs":%s,"step_ms":%.3f,"floor_ms":%.3f,"ratio_to_floor":%.2f,"tokens_per_s":%.1f,"sampled_step_ms":%.3f,"sampled_ratio_to_floor":%.2f})",
            batch, ctx, graphs ? "true" : "false", t.forward_ms, floor_ms, t.forward_ms / floor_ms,
            batch * 1e3 / t.forward_ms, t.sampled_ms, t.sampled_ms / floor_ms));
      }
      b.set_step_graphs(graphs_default);
    }
  }
  return absl::OkStatus();
}

}  // namespace

int BenchMain(int argc, char** argv) {
  // `bench --sparse`: the SpeContext decode benchmark (bench_sparse_command.cc).
  for (int i = 2; i < argc; ++i) {
    if (std::string(argv[i]) == "--sparse") return BenchSparseMain(argc, argv);
  }
  Args args;
  args.Define({"model", "HF model directory, GGUF file or llama2.c .bin"});
  args.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  args.Define({"gpu-memory-limit", "cap on device memory (0 = all)", false, false, "0"});
  args.Define({"batch", "decode batch sizes", false, false, "1,4,16,32"});
  args.Define({"context", "decode context lengths", false, false, "2048,8192,32768"});
  args.Define({"prefill", "prefill prompt lengths", false, false, "2048,8192"});
  args.Define({"prefill-chunk", "prefill chunk size", false, false, "8192"});
  args.Define({"steps", "timed decode steps per point", false, false, "20"});
  args.Define({"cuda-graphs", "decode with CUDA graphs: true, false or both (one line each)", false, false, "both"});
  DefineBatchInvariantFlag(args);
  args.Define({"out", "append JSON lines to this file"});
  return RunCommand("specontext bench", args, argc, argv, 2, RunBench);
}

}  // namespace specontext
