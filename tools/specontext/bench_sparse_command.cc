// `specontext bench --sparse`: SpeContext decode step time through SparseDecoder (docs/sparse.md
// "Benchmarks"), or dense attention over the same sequences in the same harness (`--dense`).
//
// Method. R sequences are filled by real prefill (random token ids, one sequence at a time in chunks of
// --prefill-chunk) through SparseDecoder::Forward, so the retrieval head's K cache, the host copies of
// offloaded layers and the planner's layer moves are those of a real run. A measuring point times
// --warmup + --steps decode steps of all R sequences (one random token each) and reports the median wall
// time of Forward() (which ends with the logits download). Two shapes:
//   --requests R1,R2 --context S1,S2   one point per (R, S), fresh sequences and decoder each;
//   --trajectory P:G                   the sequences grow: prefill P, then a point every --measure-every
//                                      tokens up to P + G (extending by prefill chunks in between); the
//                                      time to generate G tokens is the trapezoid integral of the measured
//                                      step time over the context, tokens/s = R·G / Σ step time.
// KV is allocated for the whole capacity up front, so the planner's choice for R × capacity tokens is
// applied before allocating (pre-planned layers); it moves further layers itself when it needs to.
// The floor of a step and the harness: bench_sparse_run.{h,cc}.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/cli/args.h"
#include "core/model/sparse_decoder.h"
#include "core/runtime/runtime.h"
#include "core/runtime/sparse_runtime.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "tools/specontext/bench_sparse_run.h"
#include "tools/specontext/commands.h"

namespace specontext {
namespace {

using Json = BenchJson;

struct Emitter {
  std::ofstream out;
  void Line(const Json& j) {
    const std::string s = j.dump();
    std::printf("%s\n", s.c_str());
    std::fflush(stdout);
    if (out.is_open()) out << s << "\n" << std::flush;
  }
};

Json ErrorLine(const char* kind, const absl::Status& st) {
  Json j;
  j["kind"] = kind;
  j["error"] = std::string(st.message());
  j["code"] = absl::StatusCodeToString(st.code());
  return j;
}

// Benchmark 2 shape: one point per (R, S).
absl::Status RunGrid(const SparseBenchSetup& s, const std::vector<int64_t>& requests, const std::vector<int64_t>& contexts,
                     std::mt19937& rng, Emitter& emit) {
  for (int64_t r : requests) {
    for (int64_t ctx : contexts) {
      SparseBenchRun run(s, rng);
      absl::Status st = run.Allocate(r, static_cast<int32_t>(ctx + s.warmup + s.steps + 8));
      if (st.ok()) st = run.Extend(static_cast<int32_t>(ctx));
      absl::StatusOr<Json> j = st.ok() ? run.Measure() : absl::StatusOr<Json>(st);
      if (!j.ok()) {
        Json e = ErrorLine("decode", j.status());
        e["attention"] = s.dense ? "dense" : "sparse";
        e["requests"] = r;
        e["context"] = ctx;
        emit.Line(e);
        continue;
      }
      Json line = Json::object();
      line["kind"] = "decode";
      line.update(*j);
      emit.Line(line);
    }
  }
  return absl::OkStatus();
}

// Benchmarks 3 and 4: the sequences grow from P to P + G; a point every `every` tokens.
absl::Status RunTrajectory(const SparseBenchSetup& s, int64_t requests, int64_t prompt, int64_t gen, int64_t every,
                           std::mt19937& rng, Emitter& emit) {
  std::vector<int64_t> points;
  for (int64_t c = prompt; c < prompt + gen; c += every) points.push_back(c);
  points.push_back(prompt + gen);
  if (every <= s.warmup + s.steps) {
    return absl::InvalidArgumentError("--measure-every must exceed --warmup + --steps (the steps advance the context)");
  }
  SparseBenchRun run(s, rng);
  absl::Status st = run.Allocate(requests, static_cast<int32_t>(prompt + gen + s.warmup + s.steps + 8));
  if (st.ok()) {
    Json p = run.Progress();
    p["kind"] = "allocated";
    emit.Line(p);
  }
  std::vector<double> ms;
  for (size_t k = 0; k < points.size() && st.ok(); ++k) {
    st = run.Extend(static_cast<int32_t>(points[k]));
    if (!st.ok()) break;
    if (k == 0) {
      Json p = run.Progress();
      p["kind"] = "filled";
      emit.Line(p);
    }
    absl::StatusOr<Json> j = run.Measure();
    if (!j.ok()) {
      st = j.status();
      break;
    }
    Json line = Json::object();
    line["kind"] = "trajectory_point";
    line.update(*j);
    emit.Line(line);
    ms.push_back((*j)["step_ms"].get<double>());
  }
  Json sum{{"kind", "trajectory"}, {"attention", s.dense ? "dense" : "sparse"}, {"requests", requests},
           {"prompt", prompt}, {"generated", gen}, {"measure_every", every}};
  if (!st.ok()) {
    Json e = ErrorLine("trajectory", st);
    e.update(sum);
    e["kind"] = "trajectory";
    e["points_measured"] = ms.size();
    e["stopped_at_context"] = ms.size() < points.size() ? points[ms.size()] : prompt + gen;
    emit.Line(e);
    return absl::OkStatus();
  }
  // Trapezoid over the measuring points: generating the tokens between c_k and c_{k+1} costs
  // (c_{k+1} - c_k) steps of mean time (t_k + t_{k+1}) / 2.
  double total_ms = 0;
  for (size_t k = 0; k + 1 < points.size(); ++k) total_ms += 0.5 * (ms[k] + ms[k + 1]) * (points[k + 1] - points[k]);
  // Tier changes (device KV growth, layer moves) happen here during the fills; a real run makes them during
  // its decode steps, so their measured time is added to the generation.
  const SparseEngineStats tiers = run.stats();
  total_ms += (tiers.kv_grow_seconds + tiers.layer_move_seconds) * 1e3;
  sum["method"] = "tokens/s = R*G / generate_seconds; generate_seconds = step time integrated over the context by "
                  "the trapezoid rule over the measuring points (median of --steps steps each) + the measured "
                  "time of the run's device KV growths and layer moves";
  sum["kv_grows"] = tiers.kv_grows;
  sum["kv_grow_seconds"] = tiers.kv_grow_seconds;
  sum["layer_moves"] = tiers.layer_moves;
  sum["layer_move_seconds"] = tiers.layer_move_seconds;
  sum["points"] = points;
  sum["step_ms"] = ms;
  sum["generate_seconds"] = total_ms / 1e3;
  sum["tokens_per_s"] = double(requests) * gen / (total_ms / 1e3);
  emit.Line(sum);
  return absl::OkStatus();
}

absl::Status RunBenchSparse(const Args& args) {
  RETURN_IF_ERROR(ApplyLogLevelFlag(args));
  ASSIGN_OR_RETURN(RuntimeOptions ro, RuntimeOptionsFromArgs(args));
  ro.show_progress = false;
  const std::string graphs_flag = args.GetString("cuda-graphs");
  if (graphs_flag != "true" && graphs_flag != "false") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda-graphs expects true or false, got \"", graphs_flag, "\""));
  }
  ro.cuda_graphs = graphs_flag == "true";
  SparseBenchSetup s;
  s.dense = args.GetBool("dense");
  if (!s.dense && !args.Has("retrieval-head")) {
    return absl::InvalidArgumentError("--sparse needs --retrieval-head DIR (write one with `specontext prune`)");
  }
  ASSIGN_OR_RETURN(s.steps, args.GetInt("steps"));
  ASSIGN_OR_RETURN(s.warmup, args.GetInt("warmup"));
  ASSIGN_OR_RETURN(s.chunk, args.GetInt("prefill-chunk"));
  if (s.steps <= 0 || s.warmup < 0 || s.chunk <= 0) {
    return absl::InvalidArgumentError("--steps and --prefill-chunk must be positive, --warmup >= 0");
  }
  ASSIGN_OR_RETURN(s.synthetic_overlap, args.GetDouble("synthetic-overlap"));
  if (s.synthetic_overlap < 0 || s.synthetic_overlap >= 1) {
    return absl::InvalidArgumentError("--synthetic-overlap must be in [0, 1) (0 = off)");
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> requests, args.GetPositiveIntList("requests"));
  ASSIGN_OR_RETURN(std::vector<int64_t> contexts, args.GetPositiveIntList("context"));
  ASSIGN_OR_RETURN(int64_t every, args.GetInt("measure-every"));
  int64_t prompt = 0, gen = 0;
  if (args.Has("trajectory")) {
    std::vector<std::string> pg = absl::StrSplit(args.GetString("trajectory"), ':');
    if (pg.size() != 2 || !absl::SimpleAtoi(pg[0], &prompt) || !absl::SimpleAtoi(pg[1], &gen) || prompt <= 0 ||
        gen <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--trajectory expects PROMPT:GEN (e.g. 2048:32768), got \"", args.GetString("trajectory"), "\""));
    }
    if (requests.size() != 1) return absl::InvalidArgumentError("--trajectory takes one --requests value");
    if (every <= 0) return absl::InvalidArgumentError("--measure-every must be positive");
  }
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed"));
  SparseRuntimeOptions sro;
  sro.retrieval_head = args.GetString("retrieval-head");
  ASSIGN_OR_RETURN(sro.budget, args.GetInt("budget"));
  ASSIGN_OR_RETURN(sro.sink, args.GetInt("sink"));
  sro.selection = args.GetString("selection");
  sro.gpu_memory_limit = ro.gpu_memory_limit;
  // The largest step run here (a prefill chunk of one sequence, a decode step of the most requests): the
  // planner's step bound (SparseStepWorkspaceBytes) is sized for it.
  sro.step.max_tokens_per_step = static_cast<int32_t>(std::min<int64_t>(s.chunk, INT32_MAX));
  sro.step.max_batch = static_cast<int32_t>(*std::max_element(requests.begin(), requests.end()));

  ASSIGN_OR_RETURN(Runtime rt, LoadRuntime(ro));
  SparseRuntime sr;
  if (!s.dense) {
    ASSIGN_OR_RETURN(sr, MakeSparseRuntime(rt, sro));  // validates flags and head
  }
  Backend& b = *rt.backend;
  b.set_host_kv_interleaved(!args.GetBool("plain-host-kv"));
  if (!args.GetString("host-kv-layer-group").empty()) {
    ASSIGN_OR_RETURN(const int64_t group, args.GetInt("host-kv-layer-group"));
    if (group < 1 || group > rt.model->config().num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat("--host-kv-layer-group ", group, " outside [1, ",
                                                     rt.model->config().num_hidden_layers, "] (the model's layers)"));
    }
    b.set_host_kv_layer_group(static_cast<int>(group));
  }
  const ModelConfig& c = rt.model->config();
  s.rt = &rt;
  s.head = sr.head.get();
  s.options.budget = static_cast<int32_t>(sro.budget);
  s.options.sink = static_cast<int32_t>(sro.sink);
  s.options.mode = sro.selection == "batch" ? SelectionMode::kBatchLevel : SelectionMode::kHeadLevel;
  s.options.synthetic_overlap = s.synthetic_overlap;
  ASSIGN_OR_RETURN(int64_t grow, args.GetInt("kv-grow-rows"));
  if (grow < 0 || grow > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--kv-grow-rows must be >= 0 (0: KV at full capacity from admission)");
  }
  s.options.kv_grow_rows = static_cast<int32_t>(grow);
  s.options.step = sro.step;
  // The planner's fixed bytes (weights, workspace bound, other live bytes) under the flag's limit.
  const double fixed_bytes =
      sr.decoder != nullptr && sr.decoder->planner().has_value() ? sr.decoder->planner()->fixed_bytes() : 0.0;
  sr.decoder.reset();
  // The planner's device limit: --gpu-memory-limit, else (CUDA) the GPU's memory (bytes in use + free), less
  // a margin (the planner counts one step's transient bytes at the chunk and request count set above) for
  // allocator slack and library workspaces the allocator does not see: 256 MiB (at most 1/8 of the limit)
  // under a given limit; 2.5 GiB when planning for the whole GPU (with 256 MiB the last KV allocation of
  // 32 sequences of 34K tokens failed in cudaMalloc on the H100, 2026-11-24; with 2 GiB, once the planner's
  // prefill staging reserve was sized for the run's sequences instead of the model's 131K context (395 MB
  // less for the 8B), a 117 MB workspace cudaMalloc failed at 34K: cuBLAS, graph pools and fragmentation
  // take that much beyond what the allocator counts).
  const MemoryReport rep = b.memory_report();
  int64_t limit = ro.gpu_memory_limit;
  int64_t margin = std::min<int64_t>(int64_t{256} << 20, limit / 8);
  if (limit == 0 && b.device() == DeviceKind::kCuda) {
    limit = rep.total + b.available_bytes();
    margin = int64_t{5} << 29;
  }
  const int64_t headroom = margin;
  if (limit > 0 && limit <= headroom) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-memory-limit ", limit, " bytes leaves nothing after ",
                                                   headroom, " bytes of margin"));
  }
  s.options.gpu_memory_limit = limit > 0 ? limit - headroom : 0;
  ASSIGN_OR_RETURN(s.bw, MeasureBandwidths(b, b.device() == DeviceKind::kCuda));
  ASSIGN_OR_RETURN(double hbm_gbs, args.GetDouble("hbm-gbs"));
  ASSIGN_OR_RETURN(double pcie_gbs, args.GetDouble("pcie-gbs"));
  if (hbm_gbs < 0 || pcie_gbs < 0) return absl::InvalidArgumentError("--hbm-gbs and --pcie-gbs must be >= 0");
  if (hbm_gbs > 0) s.bw.hbm = hbm_gbs * 1e9;
  if (pcie_gbs > 0) s.bw.pcie = pcie_gbs * 1e9;

  Emitter emit;
  if (args.Has("out")) emit.out.open(args.GetString("out"), std::ios::app);
  Json setup{{"kind", "setup"},
             {"mode", s.dense ? "dense" : "sparse"},
             {"host_kv_layout", b.host_kv_interleaved() ? "interleaved" : "plain"},
             {"host_kv_layer_group", b.host_kv_interleaved() ? b.host_kv_layer_group() : 1},
             {"cuda_graphs", ro.cuda_graphs},
             {"batch_invariant", b.batch_invariant()},
             {"backend", b.name()},
             {"model", ro.model_path},
             {"layers", c.num_hidden_layers},
             {"kv_bytes_per_token", rt.model->KvBytesPerToken()},
             {"weight_bytes", rep.bytes[static_cast<size_t>(MemoryKind::kWeights)]},
             {"retrieval_head", sro.retrieval_head},
             {"head_kind", s.head == nullptr                                     ? "none"
                           : s.head->config().kind == RetrievalHeadKind::kEagle3 ? "eagle3"
                                                                                 : "layer"},
             {"head_parameters", s.head == nullptr ? 0 : s.head->parameter_count()},
             {"budget", s.options.budget},
             {"sink", s.options.sink},
             {"kv_grow_rows", s.options.kv_grow_rows},
             {"sampling", b.device_sampling() ? "device (greedy; ids downloaded)" : "none (host logits downloaded)"},
             {"planner_limit_bytes", s.options.gpu_memory_limit},
             {"planner_fixed_bytes", fixed_bytes},
             {"prefill_headroom_bytes", headroom},
             {"copy_bandwidth_gbs", s.bw.hbm / 1e9},
             {"pcie_d2h_gbs", s.bw.pcie / 1e9},
             {"steps", s.steps},
             {"warmup", s.warmup},
             {"prefill_chunk", s.chunk}};
  emit.Line(setup);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  if (args.Has("trajectory")) return RunTrajectory(s, requests[0], prompt, gen, every, rng, emit);
  return RunGrid(s, requests, contexts, rng, emit);
}

}  // namespace

int BenchSparseMain(int argc, char** argv) {
  Args args;
  args.Define({"sparse", "SpeContext decode benchmark (this mode)", true, false, ""});
  args.Define({"dense", "dense attention over the same sequences in the same harness", true, false, ""});
  args.Define({"cuda-graphs", "decode steps replayed from CUDA graphs: true or false (A/B)", false, false, "true"});
  DefineBatchInvariantFlag(args);
  args.Define({"plain-host-kv", "host tiers with K and V apart, not interleaved (A/B of the layout)", true, false, ""});
  args.Define({"host-kv-layer-group", "offloaded layers per interleaved host allocation (default: the backend's)",
               false, false, ""});
  args.Define({"model", "HF model directory or GGUF file", false, false, ""});
  args.Define({"tokenizer", "unused (accepted for symmetry with generate)", false, false, ""});
  args.Define({"backend", "cpu, cuda or auto", false, false, "auto"});
  args.Define({"threads", "CPU threads (0 = the CPUs this process may use)", false, false, "0"});
  args.Define({"gpu-memory-limit", "device memory cap, also the planner's limit (0 = the GPU's memory)", false, false,
               "0"});
  args.Define({"retrieval-head", "retrieval head directory (specontext prune)", false, false, ""});
  args.Define({"budget", "past tokens per KV head", false, false, "2048"});
  args.Define({"sink", "first tokens always attended", false, false, "1"});
  args.Define({"selection", "head or batch", false, false, "head"});
  args.Define({"kv-grow-rows", "sparse: device KV grows in chunks of this many tokens (0: whole capacity at admission)",
               false, false, "2048"});
  args.Define({"synthetic-overlap", "replace index sets by ones with this overlap with the last step's (0 = off)",
               false, false, "0"});
  args.Define({"requests", "sequences per step (comma list; one value with --trajectory)", false, false, "1"});
  args.Define({"context", "context lengths of the grid points (comma list)", false, false, "8192"});
  args.Define({"trajectory", "PROMPT:GEN: grow the sequences from PROMPT to PROMPT+GEN tokens", false, false, ""});
  args.Define({"measure-every", "tokens between trajectory points", false, false, "4096"});
  args.Define({"steps", "timed decode steps per point", false, false, "10"});
  args.Define({"warmup", "untimed decode steps before each point", false, false, "3"});
  args.Define({"prefill-chunk", "tokens per prefill forward", false, false, "4096"});
  args.Define({"seed", "random token ids", false, false, "1"});
  args.Define({"hbm-gbs", "device bandwidth for the floor, GB/s (0 = measure a device copy)", false, false, "0"});
  args.Define({"pcie-gbs", "host link bandwidth for the floor, GB/s (0 = measure device -> pinned host)", false,
               false, "0"});
  args.Define({"out", "append JSON lines to this file", false, false, ""});
  args.Define({"log-level", "debug, info, warning or error", false, false, "warning"});
  return RunCommand("specontext bench --sparse", args, argc, argv, 2, RunBenchSparse);
}

}  // namespace specontext
