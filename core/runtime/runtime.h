// Everything a program needs to generate: a backend, the checkpoint, the model and its tokenizer.
// Shared by the CLI, the services and the benchmarks.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/io/weight_source.h"
#include "core/model/transformer.h"
#include "core/parallel/tensor_parallel_devices.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"

namespace specontext {

struct RuntimeOptions {
  std::string model_path;       // HF directory or llama2.c .bin
  std::string tokenizer_path;   // optional: tokenizer.json or llama2.c tokenizer .bin
  std::string backend = "auto"; // "cpu", "cuda" or "auto" (cuda when built and a GPU is present)
  int64_t gpu_memory_limit = 0; // bytes, 0 = all
  int threads = 0;              // CPU threads, 0 = DefaultCpuThreads() (the usable CPUs)
  bool show_progress = false;   // a progress line on stderr while weights load
  bool cuda_graphs = true;      // record dense decode steps as CUDA graphs (Backend::set_step_graphs)
  // Bitwise the same results for a sequence whatever else is batched with it (Backend::set_batch_invariant;
  // docs/gpu.md "Batch-invariant decoding"). Slower; refused by a backend without the mode.
  bool batch_invariant = false;
  // Ranks of tensor parallelism (docs/tensor-parallel.md): > 1 loads one model shard per rank, each on its
  // own backend. CPU: joined by an in-process communicator. CUDA: see tensor_parallel_devices.
  int tensor_parallel = 1;
  // CUDA backend under tensor parallelism: kSeparate puts rank r on GPU r with NCCL (refused when fewer GPUs
  // are visible than ranks); kShared puts every rank on GPU 0 with its own backend (stream, cuBLAS handle,
  // memory accounting) and stages each all-reduce through host memory: a test mode for one-GPU machines. There
  // each rank's --gpu-memory-limit defaults to 1/N of the GPU's free memory. Ignored by the CPU backend.
  TensorParallelDevices tensor_parallel_devices = TensorParallelDevices::kSeparate;
};

struct Runtime {
  std::unique_ptr<Backend> backend;
  Checkpoint checkpoint;
  std::unique_ptr<Transformer> model;
  std::unique_ptr<Tokenizer> tokenizer;  // null when none was found
  // With RuntimeOptions::tensor_parallel > 1: `backend` and `model` are rank 0's shard; `tp_comms` has every
  // rank's communicator (index = rank) and `tp_backends` / `tp_models` ranks 1.. (index = rank - 1). Each
  // rank's model is driven by its own thread, every rank running the same forwards in the same order; a
  // rank's thread calls its backend's MakeCurrent() first (CUDA ranks may sit on different GPUs).
  // LoadRuntime leaves rank 0's backend current on the calling thread.
  std::vector<std::unique_ptr<Communicator>> tp_comms;
  std::vector<std::unique_ptr<Backend>> tp_backends;
  std::vector<std::unique_ptr<Transformer>> tp_models;
  // The tokenizer_config.json text that came with the tokenizer (beside tokenizer.json, or embedded
  // in a GGUF); "" when none. Holds the model's chat_template.
  std::string tokenizer_config_json;
};

// Names of the backends compiled into this build ("cpu", and "cuda" when built with CUDA).
std::vector<std::string> AvailableBackends();
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int64_t memory_limit);
absl::StatusOr<Runtime> LoadRuntime(const RuntimeOptions& options);

// The default KV budget of a serving engine (EngineOptions::max_kv_bytes, the generator's --max-kv-bytes
// auto): 90% of what `backend` may still allocate once the model is loaded (its limit or free device
// memory) less `step_workspace`, the transient bytes of the engine's largest step
// (Transformer::ForwardWorkspaceBytes), for the CPU backend also at most 90% of the host's available memory
// (MemAvailable, and the cgroup's memory.max less memory.current), so a request is refused or queued instead
// of a step failing past the limit or the process being killed by the OOM killer. At least 1 byte.
// `host_sharers` CPU backends of this process taking a budget each (tensor-parallel ranks) get that share of
// the host's available memory each.
int64_t DefaultKvBudgetBytes(const Backend& backend, int64_t step_workspace = 0, int host_sharers = 1);

class Args;
// RuntimeOptions from the flags the serving CLIs share: --model (required), --tokenizer, --backend,
// --gpu-memory-limit, --threads, and --cuda-graphs=true|false, --batch-invariant and --tensor-parallel-devices
// where the CLI defines them (see DefineCudaGraphsFlag, DefineBatchInvariantFlag,
// DefineTensorParallelDevicesFlag).
absl::StatusOr<RuntimeOptions> RuntimeOptionsFromArgs(const Args& args);
// Defines --tensor-parallel-devices (separate or shared, default separate) on a CLI's Args;
// RuntimeOptionsFromArgs reads it (separate where a CLI does not define it).
void DefineTensorParallelDevicesFlag(Args& args);
// Defines --cuda-graphs (default true) on a CLI's Args.
void DefineCudaGraphsFlag(Args& args);
// Parses --cuda-graphs: true when the flag is not defined or not given.
absl::StatusOr<bool> CudaGraphsFromArgs(const Args& args);
// Defines --batch-invariant (a switch, default off) on a CLI's Args; RuntimeOptionsFromArgs reads it
// (false where a CLI does not define it).
void DefineBatchInvariantFlag(Args& args);

// Tokenizes a prompt (with the tokenizer's default BOS unless `templated`: chat templates write
// their own). Empty text gives just BOS (the config's when the tokenizer has none).
absl::StatusOr<std::vector<int32_t>> EncodePrompt(const Runtime& runtime, const std::string& text,
                                                  bool templated = false);

// Renders and tokenizes chat `messages` with the assistant's opening (EncodeChat): special tokens count
// only in the template's own text, so a message cannot forge a turn; the template writes its BOS.
absl::StatusOr<std::vector<int32_t>> EncodeChatPrompt(const Runtime& runtime, const ChatTemplate& tmpl,
                                                      std::span<const ChatMessage> messages);

// "auto" takes the chat format from the model's chat_template (tokenizer_config.json or the GGUF's
// embedded one), with its default system prompt and date block; a model whose template is none of
// the built-in formats is refused (Unimplemented) rather than rendered in another layout. Without
// a template the architecture decides (Qwen2 -> chatml, Qwen3 -> qwen3, Llama with
// <|start_header_id|> -> llama3). Other names are parsed (llama3, chatml, qwen3, deepseek-r1, none).
absl::StatusOr<ChatTemplate> ResolveChatTemplate(const std::string& name, const Runtime& runtime);

}  // namespace specontext
