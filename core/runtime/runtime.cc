#include "core/runtime/runtime.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/cli/args.h"
#include "core/log.h"
#include "core/parallel/cpu_limits.h"
#include "core/parallel/parallel_for.h"
#include "core/status_macros.h"
#ifdef SPECONTEXT_HAVE_CUDA
#include "core/cuda/cuda_backend.h"
#endif
#ifdef SPECONTEXT_HAVE_NCCL
#include "core/cuda/nccl_communicator.h"
#endif

extern "C" void openblas_set_num_threads(int num_threads);

namespace specontext {

std::vector<std::string> AvailableBackends() {
#ifdef SPECONTEXT_HAVE_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

namespace {

// Host memory this process may still take: /proc/meminfo MemAvailable, within the cgroup (v2) limit.
int64_t HostMemoryAvailable() {
  int64_t avail = -1;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") {
      avail = kib * 1024;
      break;
    }
  }
  if (avail < 0) avail = static_cast<int64_t>(sysconf(_SC_AVPHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  std::ifstream max_file("/sys/fs/cgroup/memory.max"), current_file("/sys/fs/cgroup/memory.current");
  std::string max_text;
  int64_t current = 0;
  if (max_file >> max_text && max_text != "max" && current_file >> current) {
    const int64_t limit = std::atoll(max_text.c_str());
    if (limit > 0) avail = std::min(avail, std::max<int64_t>(0, limit - current));
  }
  return avail;
}

}  // namespace

int64_t DefaultKvBudgetBytes(const Backend& backend, int64_t step_workspace, int host_sharers) {
  int64_t avail = backend.available_bytes() - std::max<int64_t>(0, step_workspace);
  if (backend.name() == "cpu") avail = std::min(avail, HostMemoryAvailable() / std::max(1, host_sharers));
  return std::max<int64_t>(1, avail / 10 * 9);
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int64_t memory_limit) {
  if (name == "cpu") return MakeCpuBackend(memory_limit);
#ifdef SPECONTEXT_HAVE_CUDA
  if (name == "cuda" || name == "auto") {
    CudaBackendOptions options;
    options.memory_limit = memory_limit;
    auto backend = MakeCudaBackend(options);
    if (backend.ok() || name == "cuda") return backend;
    SPC_LOG(INFO) << "no usable GPU, using the CPU backend" << Kv("reason", backend.status().ToString());
  }
#else
  if (name == "cuda") {
    return absl::UnavailableError("this build has no CUDA backend (configure with nvcc to build it)");
  }
#endif
  if (name == "auto") return MakeCpuBackend(memory_limit);
  return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (available: ",
                                                 absl::StrJoin(AvailableBackends(), ", "), ", auto)"));
}

namespace {

class ProgressLine {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled), tty_(isatty(STDERR_FILENO)) {}
  // Large checkpoints only; a terminal gets one rewritten line, a log one line per 10%.
  void Update(int64_t done, int64_t total) {
    if (!enabled_ || total < (int64_t{64} << 20)) return;
    const int pct = static_cast<int>(100 * done / total);
    if (pct < next_pct_ && done != total) return;
    next_pct_ = pct + (tty_ ? 2 : 10);
    std::fprintf(stderr, "%sloading weights: %3d%% (%.2f / %.2f GB)%s", tty_ ? "\r" : "", pct, done / 1e9,
                 total / 1e9, done == total || !tty_ ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool tty_;
  int next_pct_ = 0;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path) {
  if (path.size() > 5 && path.substr(path.size() - 5) == ".json") return LoadHfTokenizer(path);
  if (std::filesystem::is_directory(path)) return LoadHfTokenizer(path + "/tokenizer.json");
  return LoadLlama2cTokenizer(path);
}

// tokenizer_config.json beside a tokenizer.json (or in a tokenizer folder); "" when absent.
std::string ReadConfigBeside(const std::string& tokenizer_path) {
  if (tokenizer_path.empty()) return "";
  const std::filesystem::path p(tokenizer_path);
  const auto config = (std::filesystem::is_directory(p) ? p : p.parent_path()) / "tokenizer_config.json";
  std::ifstream in(config);
  if (!in.good()) return "";
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The backends of ranks 1.. (rt.tp_backends) and every rank's communicator (rt.tp_comms), rt.backend being
// rank 0's; for the shared-device mode rank 0's backend is made again with its share of the GPU.
absl::Status MakeTensorParallelRanks(const RuntimeOptions& options, Runtime& rt) {
  const int tp = options.tensor_parallel;
  if (rt.backend->device() == DeviceKind::kCpu) {
    rt.tp_comms = CreateInProcessGroup(tp);
    for (int r = 1; r < tp; ++r) {
      ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, MakeBackend("cpu", options.gpu_memory_limit));
      RETURN_IF_ERROR(b->set_batch_invariant(options.batch_invariant));
      rt.tp_backends.push_back(std::move(b));
    }
    return absl::OkStatus();
  }
#ifdef SPECONTEXT_HAVE_CUDA
  const TensorParallelDevices mode = options.tensor_parallel_devices;
  ASSIGN_OR_RETURN(std::vector<int> devices, TensorParallelDeviceIds(tp, mode, CudaDeviceCount()));
  int64_t limit = options.gpu_memory_limit;
  if (mode == TensorParallelDevices::kShared && limit == 0) {
    // N backends on one GPU each see all of its free memory: without a split every rank's KV budget and
    // planner would count the same bytes N times.
    limit = CudaDeviceFreeBytes(0) / tp;
    SPC_LOG(INFO) << "tensor-parallel ranks share GPU 0" << Kv("ranks", tp) << Kv("memory_limit_per_rank", limit);
  }
  auto make = [&](int device) -> absl::StatusOr<std::unique_ptr<Backend>> {
    CudaBackendOptions co;
    co.device = device;
    co.memory_limit = limit;
    co.cuda_graphs = options.cuda_graphs;
    co.batch_invariant = options.batch_invariant;
    return MakeCudaBackend(co);
  };
  if (limit != options.gpu_memory_limit) {
    rt.backend.reset();
    ASSIGN_OR_RETURN(rt.backend, make(devices[0]));
  }
  std::vector<Backend*> backends = {rt.backend.get()};
  for (int r = 1; r < tp; ++r) {
    ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, make(devices[r]));
    backends.push_back(b.get());
    rt.tp_backends.push_back(std::move(b));
  }
  if (mode == TensorParallelDevices::kShared) {
    rt.tp_comms = CreateHostStagedGroup(backends);
    return absl::OkStatus();
  }
#ifdef SPECONTEXT_HAVE_NCCL
  ASSIGN_OR_RETURN(rt.tp_comms, CreateNcclGroup(backends, devices));
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(absl::StrCat(
      "--tensor-parallel ", tp, " over separate GPUs needs NCCL, and this build has none (nccl.h was not found "
      "at configure time); --tensor-parallel-devices shared runs every rank on GPU 0 without it"));
#endif
#else
  return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel ", tp, ": backend ", rt.backend->name(),
                                                 " has no tensor-parallel communicator"));
#endif
}

}  // namespace

absl::StatusOr<Runtime> LoadRuntime(const RuntimeOptions& options) {
  if (options.threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  const int threads = options.threads > 0 ? options.threads : DefaultCpuThreads();
  // The CPU backend splits OpenBLAS calls over its own pool (cpu_gemm.cc): OpenBLAS's threads wait
  // for each other by yielding, which made decode 38x slower when other processes shared the cores.
  openblas_set_num_threads(1);
  SetCpuThreads(threads);
  Runtime rt;
  ASSIGN_OR_RETURN(rt.checkpoint, OpenCheckpoint(options.model_path));
  // --tokenizer wins; else a tokenizer embedded in the model file (GGUF); else tokenizer.json beside it.
  std::string tok_path = options.tokenizer_path;
  const bool embedded = tok_path.empty() && !rt.checkpoint.embedded_tokenizer_json.empty();
  if (tok_path.empty() && !embedded) tok_path = rt.checkpoint.tokenizer_path;
  if (embedded || !tok_path.empty()) {
    auto tok = embedded ? ParseHfTokenizer(rt.checkpoint.embedded_tokenizer_json,
                                           rt.checkpoint.embedded_tokenizer_config_json)
                        : LoadTokenizer(tok_path);
    if (!tok.ok()) {
      return absl::Status(tok.status().code(), absl::StrCat("tokenizer ", embedded ? "in " + options.model_path : tok_path,
                                                            ": ", tok.status().message()));
    }
    rt.tokenizer = *std::move(tok);
    rt.tokenizer_config_json = embedded ? rt.checkpoint.embedded_tokenizer_config_json : ReadConfigBeside(tok_path);
    if (rt.tokenizer->vocab_size() > rt.checkpoint.config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("the tokenizer has ", rt.tokenizer->vocab_size(),
                                                     " tokens but the model's vocabulary has only ",
                                                     rt.checkpoint.config.vocab_size));
    }
  }
  if (rt.checkpoint.generation.repetition_penalty != 1.0) {
    SPC_LOG(WARNING) << "generation_config.json sets a repetition penalty that this engine does not apply"
                     << Kv("repetition_penalty", rt.checkpoint.generation.repetition_penalty);
  }
  ASSIGN_OR_RETURN(rt.backend, MakeBackend(options.backend, options.gpu_memory_limit));
  rt.backend->set_step_graphs(options.cuda_graphs);
  if (absl::Status s = rt.backend->set_batch_invariant(options.batch_invariant); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("--batch-invariant: ", s.message()));
  }
  ProgressLine progress(options.show_progress);
  const int tp = options.tensor_parallel;
  if (tp < 1) return absl::InvalidArgumentError("--tensor-parallel must be at least 1");
  if (tp > 1) RETURN_IF_ERROR(MakeTensorParallelRanks(options, rt));
  // Shards load one after the other (no collective runs while loading), each with its backend's device
  // current; rank 0's shows the progress and is current again at the end.
  RETURN_IF_ERROR(rt.backend->MakeCurrent());
  ASSIGN_OR_RETURN(rt.model, Transformer::Load(rt.checkpoint, rt.backend.get(),
                                               [&](int64_t done, int64_t total) { progress.Update(done, total); },
                                               {0, tp, tp > 1 ? rt.tp_comms[0].get() : nullptr}));
  for (int r = 1; r < tp; ++r) {
    RETURN_IF_ERROR(rt.tp_backends[r - 1]->MakeCurrent());
    ASSIGN_OR_RETURN(std::unique_ptr<Transformer> m,
                     Transformer::Load(rt.checkpoint, rt.tp_backends[r - 1].get(), {}, {r, tp, rt.tp_comms[r].get()}));
    rt.tp_models.push_back(std::move(m));
  }
  RETURN_IF_ERROR(rt.backend->MakeCurrent());
  return rt;
}

absl::StatusOr<RuntimeOptions> RuntimeOptionsFromArgs(const Args& args) {
  if (!args.Has("model")) return absl::InvalidArgumentError("--model is required");
  RuntimeOptions ro;
  ro.model_path = args.GetString("model");
  ro.tokenizer_path = args.GetString("tokenizer");
  ro.backend = args.GetString("backend");
  ASSIGN_OR_RETURN(ro.gpu_memory_limit, args.GetBytes("gpu-memory-limit"));
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads"));
  ro.threads = static_cast<int>(threads);
  ASSIGN_OR_RETURN(ro.cuda_graphs, CudaGraphsFromArgs(args));
  ro.batch_invariant = args.GetBool("batch-invariant");
  if (const std::string devices = args.GetString("tensor-parallel-devices"); !devices.empty()) {
    ASSIGN_OR_RETURN(ro.tensor_parallel_devices, ParseTensorParallelDevices(devices));
  }
  return ro;
}

void DefineTensorParallelDevicesFlag(Args& args) {
  args.Define({"tensor-parallel-devices",
               "CUDA ranks of --tensor-parallel: separate (rank r on GPU r, NCCL) or shared (every rank on GPU 0, "
               "all-reduces through host memory: a test mode for one-GPU machines)",
               false, false, "separate"});
}

void DefineBatchInvariantFlag(Args& args) {
  args.Define({"batch-invariant",
               "bitwise the same tokens for a request whatever else is batched with it (slower; docs/gpu.md)", true,
               false, "false"});
}

void DefineCudaGraphsFlag(Args& args) {
  args.Define({"cuda-graphs", "record dense decode steps as CUDA graphs (true or false)", false, false, "true"});
}

absl::StatusOr<bool> CudaGraphsFromArgs(const Args& args) {
  const std::string v = args.GetString("cuda-graphs");
  if (v.empty() || v == "true" || v == "1") return true;
  if (v == "false" || v == "0") return false;
  return absl::InvalidArgumentError(absl::StrCat("--cuda-graphs expects true or false, got \"", v, "\""));
}

absl::StatusOr<std::vector<int32_t>> EncodePrompt(const Runtime& rt, const std::string& text, bool templated) {
  std::vector<int32_t> ids;
  if (rt.tokenizer != nullptr) {
    ASSIGN_OR_RETURN(ids, rt.tokenizer->Encode(text, !templated && rt.tokenizer->default_add_bos()));
  } else if (!text.empty()) {
    return absl::InvalidArgumentError("the model has no tokenizer: pass --tokenizer FILE");
  }
  if (ids.empty()) {
    const int64_t bos = rt.tokenizer != nullptr && rt.tokenizer->bos_id() >= 0 ? rt.tokenizer->bos_id()
                                                                                 : rt.checkpoint.config.bos_token_id;
    if (bos < 0) return absl::InvalidArgumentError("the prompt is empty and the model has no BOS token");
    ids.push_back(static_cast<int32_t>(bos));
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> EncodeChatPrompt(const Runtime& rt, const ChatTemplate& tmpl,
                                                      std::span<const ChatMessage> messages) {
  if (rt.tokenizer == nullptr) return absl::InvalidArgumentError("chat messages need a tokenizer: pass --tokenizer FILE");
  const bool add_bos = tmpl.kind == ChatTemplateKind::kNone && rt.tokenizer->default_add_bos();
  return EncodeChat(*rt.tokenizer, tmpl, messages, /*add_generation_prompt=*/true, add_bos);
}

}  // namespace specontext

namespace specontext {

absl::StatusOr<ChatTemplate> ResolveChatTemplate(const std::string& name, const Runtime& rt) {
  if (name != "auto") return ParseChatTemplate(name);
  // Runtimes built without LoadRuntime may have only the checkpoint's tokenizer path.
  const std::string config =
      !rt.tokenizer_config_json.empty() ? rt.tokenizer_config_json : ReadConfigBeside(rt.checkpoint.tokenizer_path);
  if (!config.empty()) {
    ASSIGN_OR_RETURN(std::optional<ChatTemplate> from_model, ChatTemplateFromConfig(config));
    if (from_model.has_value()) return *std::move(from_model);
  }
  switch (rt.checkpoint.config.arch) {
    case Architecture::kQwen2: return ParseChatTemplate("chatml");
    case Architecture::kQwen3: return ParseChatTemplate("qwen3");
    case Architecture::kLlama:
      if (rt.tokenizer != nullptr && rt.tokenizer->TokenToId("<|start_header_id|>").has_value()) {
        return ParseChatTemplate("llama3");
      }
      break;
  }
  return absl::InvalidArgumentError("cannot tell this model's chat format: pass --chat-template NAME");
}

}  // namespace specontext
