// Tensor parallelism on the CUDA backend with one GPU (docs/tensor-parallel.md "Ranks are threads"): every rank
// is a thread with its own CudaBackend (stream, cuBLAS handle, memory accounting, graphs) on device 0, joined by
// the host-staged group (CreateHostStagedGroup: download, the in-process rank-order sum, upload).
//   - the host-staged all-reduce equals the rank-order f32 sum bit for bit (f32 and bf16, odd sizes), the same
//     bits on every rank; two backends on one device run the same decode side by side with graphs on.
//   - dense TP 2 and 4 against TP 1 on the same GPU (tests/model/tensor_parallel_harness.h), on tiny checkpoints
//     and a stories260K-shaped random GQA model: prefill and 16 decode steps fed TP 1's greedy tokens, logits
//     within bf16 tolerance, TP 1's greedy token wherever its top-2 margin exceeds that tolerance, every rank's
//     logits bit-identical.
//   - sparse TP 2 and 4 against sparse TP 1 (tests/sparse_engine/tensor_parallel_sparse_harness.h): the ragged
//     batch with budgets below the pasts, head- and batch-level, layers offloaded; logits as above and each
//     rank's index sets exactly TP 1's sets of its KV heads.
//   - the runtime: --tensor-parallel-devices shared loads N ranks on GPU 0 with 1/N of its memory each, and their
//     engines sample the same tokens; separate with more ranks than GPUs is refused with InvalidArgument.
// NCCL over separate GPUs: tests/cuda/nccl_tensor_parallel_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend.h"
#include "core/io/weight_source.h"
#include "core/model/engine.h"
#include "core/parallel/communicator.h"
#include "core/runtime/runtime.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/model/tensor_parallel_harness.h"
#include "tests/sparse_engine/tensor_parallel_sparse_harness.h"

namespace specontext::testing {
namespace {

// bf16 activations: the ranks' partial sums round differently from the unsharded GEMMs.
constexpr Tolerance kTpTolerance{3e-2, 3e-2, 2e-2};

// `size` backends on GPU 0 (empty without a GPU).
std::vector<std::unique_ptr<Backend>> SharedGpuBackends(int size) {
  std::vector<std::unique_ptr<Backend>> out;
  if (CudaDeviceCount() == 0) return out;
  for (int r = 0; r < size; ++r) {
    auto b = MakeCudaBackend({.device = 0});
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return {};
    out.push_back(*std::move(b));
  }
  return out;
}

std::vector<Backend*> Raw(const std::vector<std::unique_ptr<Backend>>& owned) {
  std::vector<Backend*> out;
  for (const auto& b : owned) out.push_back(b.get());
  return out;
}

Tensor HostView(std::vector<float>& v) { return Tensor(v.data(), DType::kF32, {static_cast<int64_t>(v.size())}); }

// TP's logits against TP 1's (fed TP 1's tokens): within kTpTolerance; TP 1's greedy token wherever its
// top-2 margin is beyond what that tolerance could swap. Returns the steps whose token was checked.
int ExpectCloseToTp1(const std::vector<std::vector<float>>& ref, const std::vector<std::vector<float>>& got,
                     const std::string& what) {
  EXPECT_EQ(got.size(), ref.size()) << what;
  int checked = 0;
  for (size_t k = 0; k < std::min(ref.size(), got.size()); ++k) {
    std::vector<float> want = ref[k], have = got[k];
    ExpectClose(HostView(have), HostView(want), kTpTolerance, absl::StrCat(what, " row ", k));
    std::vector<float> sorted = want;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    const float top = sorted[0];
    if (top - sorted[1] > 2 * (kTpTolerance.atol + kTpTolerance.rtol * std::fabs(top))) {
      ++checked;
      EXPECT_EQ(Greedy(have.data(), static_cast<int64_t>(have.size())),
                Greedy(want.data(), static_cast<int64_t>(want.size())))
          << what << " row " << k << ": another greedy token than TP 1";
    }
  }
  return checked;
}

TEST(HostStagedGroup, AllReduceEqualsRankOrderSum) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(FreshSeed());
  for (int size : {2, 3, 4}) {
    std::vector<std::unique_ptr<Backend>> owned = SharedGpuBackends(size);
    ASSERT_EQ(owned.size(), static_cast<size_t>(size));
    const std::vector<Backend*> backends = Raw(owned);
    auto comms = CreateHostStagedGroup(backends);
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (int64_t n : {1, 17, 97, 2049}) {
        std::vector<Tensor> in;
        std::vector<float> sum(n, 0.0f);
        for (int r = 0; r < size; ++r) {
          in.push_back(RandomHost({n}, rng));  // bf16-representable
          for (int64_t i = 0; i < n; ++i) sum[i] += in.back().as<float>()[i];  // rank order, f32
        }
        if (dtype == DType::kBF16) {
          for (float& x : sum) x = Bf16ToF32(F32ToBf16(x));  // rounded once at the end
        }
        std::vector<Tensor> out(size);
        std::vector<absl::Status> st(size);
        std::vector<std::thread> threads;
        for (int r = 0; r < size; ++r) {
          threads.emplace_back([&, r] {
            st[r] = [&]() -> absl::Status {
              RETURN_IF_ERROR(backends[r]->MakeCurrent());
              ASSIGN_OR_RETURN(Tensor d, backends[r]->ToDevice(in[r], dtype, MemoryKind::kWorkspace));
              RETURN_IF_ERROR(comms[r]->AllReduceSum(&d));
              RETURN_IF_ERROR(backends[r]->Synchronize());
              out[r] = DeviceToF32(*backends[r], d);
              return absl::OkStatus();
            }();
            if (!st[r].ok()) comms[r]->Abort();
          });
        }
        for (std::thread& t : threads) t.join();
        for (int r = 0; r < size; ++r) ASSERT_TRUE(st[r].ok()) << "rank " << r << ": " << st[r];
        for (int r = 0; r < size; ++r) {
          ASSERT_EQ(std::memcmp(out[r].data(), sum.data(), n * sizeof(float)), 0)
              << "size " << size << " rank " << r << " n " << n << " dtype " << DTypeName(dtype);
        }
      }
    }
  }
}

TEST(HostStagedGroup, BackendsOnOneDeviceAreIndependent) {
  // Two backends on GPU 0, each driven by its own thread, run the same unsharded decode (step graphs on) side by
  // side: the same logits bit for bit as each other, own streams, own memory accounting.
  std::vector<std::unique_ptr<Backend>> owned = SharedGpuBackends(2);
  if (owned.empty()) GTEST_SKIP() << "no CUDA device";
  ASSERT_NE(*CudaComputeStream(*owned[0]), *CudaComputeStream(*owned[1]));
  const int64_t before = owned[1]->memory_report().total;
  auto ck = OpenCheckpoint(SPECONTEXT_TEST_DATA "/tiny/tiny-llama-tied-gqa");
  ASSERT_TRUE(ck.ok()) << ck.status();
  std::vector<absl::StatusOr<TpTrace>> got(2, absl::UnknownError("not run"));
  {
    absl::StatusOr<TpTrace> probe = RunTpRank(*ck, owned[0].get(), {});  // rank 0 alone first
    ASSERT_TRUE(probe.ok()) << probe.status();
    EXPECT_EQ(owned[1]->memory_report().total, before) << "backend 0's model was counted on backend 1";
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      absl::Status s = owned[i]->MakeCurrent();
      got[i] = s.ok() ? RunTpRank(*ck, owned[i].get(), {}) : absl::StatusOr<TpTrace>(s);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(got[i].ok()) << got[i].status();
  EXPECT_EQ(got[0]->logits, got[1]->logits);
  EXPECT_EQ(got[0]->tokens, got[1]->tokens);
}

void ExpectDenseMatchesTp1(const Checkpoint& ck, int size, const std::string& what) {
  std::vector<std::unique_ptr<Backend>> owned = SharedGpuBackends(size + 1);
  if (owned.empty()) GTEST_SKIP() << "no CUDA device";
  absl::StatusOr<TpTrace> ref = RunTpRank(ck, owned[size].get(), {});  // TP 1 on its own backend
  ASSERT_TRUE(ref.ok()) << ref.status();
  owned.pop_back();
  const std::vector<Backend*> backends = Raw(owned);
  auto ranks = RunTpRanks(ck, backends, CreateHostStagedGroup(backends), &ref->tokens);
  for (int r = 0; r < size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  const int checked = ExpectCloseToTp1(ref->logits, ranks[0]->logits, absl::StrCat(what, " TP ", size));
  ::testing::Test::RecordProperty("greedy_steps_checked", checked);
  for (int r = 1; r < size; ++r) {
    EXPECT_EQ(ranks[r]->logits, ranks[0]->logits) << what << ": rank " << r << " computed other logits than rank 0";
  }
}

class DenseSharedGpu : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(DenseSharedGpu, MatchesTp1) {
  const auto& [name, size] = GetParam();
  if (name == "stories260k_shaped") {
    ExpectDenseMatchesTp1(RandomCheckpoint(Stories260kShape(), 5), size, name);
    return;
  }
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(std::string(SPECONTEXT_TEST_DATA "/tiny/") + name);
  ASSERT_TRUE(ck.ok()) << ck.status();
  ExpectDenseMatchesTp1(*ck, size, name);
}

INSTANTIATE_TEST_SUITE_P(Tp, DenseSharedGpu,
                         ::testing::Values(std::make_tuple("tiny-llama-tied-gqa", 2), std::make_tuple("tiny-llama", 2),
                                           std::make_tuple("tiny-llama", 4), std::make_tuple("tiny-qwen2", 2),
                                           std::make_tuple("stories260k_shaped", 2),
                                           std::make_tuple("stories260k_shaped", 4)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_tp" + std::to_string(std::get<1>(info.param));
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

struct SparseCase {
  std::string name;
  bool stories;  // the stories260K-shaped model (4 KV heads); else tiny-llama-tied-gqa (2 KV heads)
  int size;
  SelectionMode mode = SelectionMode::kHeadLevel;
  int32_t offload_to = -1;
};

class SparseSharedGpu : public ::testing::TestWithParam<SparseCase> {};

TEST_P(SparseSharedGpu, MatchesTp1) {
  const SparseCase& c = GetParam();
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  absl::StatusOr<SparseTpFiles> files = c.stories ? Stories260kShapedFiles() : TinyGqaFiles();
  ASSERT_TRUE(files.ok()) << files.status();
  absl::StatusOr<Checkpoint> ck = OpenCheckpoint(files->model);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto head = RetrievalHead::Load(files->head, ck->config, ck->weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  SparseTpSetup setup;
  setup.options.budget = 6;
  setup.options.mode = c.mode;
  setup.offload_to = c.offload_to;
  std::vector<std::unique_ptr<Backend>> owned = SharedGpuBackends(c.size + 1);
  ASSERT_EQ(owned.size(), static_cast<size_t>(c.size + 1));
  SparseTpSetup ref_setup = setup;
  ref_setup.offload_to = -1;  // moves must not change outputs
  absl::StatusOr<SparseTpTrace> ref = RunSparseTpRank(*ck, head->get(), owned[c.size].get(), {}, ref_setup);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ASSERT_GT(ref->stats.sparse_steps, 0);
  owned.pop_back();
  const std::vector<Backend*> backends = Raw(owned);
  auto ranks = RunSparseTpRanks(*ck, head->get(), backends, CreateHostStagedGroup(backends), setup, &ref->tokens);
  for (int r = 0; r < c.size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  ExpectCloseToTp1(ref->logits, ranks[0]->logits, absl::StrCat(c.name, " sparse"));
  bool pruned = false;
  for (int r = 0; r < c.size; ++r) {
    const SparseTpTrace& t = *ranks[r];
    EXPECT_EQ(t.logits, ranks[0]->logits) << "rank " << r << " computed other logits than rank 0";
    EXPECT_EQ(t.stats.sparse_steps, ref->stats.sparse_steps) << "rank " << r;
    ASSERT_EQ(t.sets.size(), ref->sets.size());
    for (size_t step = 0; step < ref->sets.size(); ++step) {
      ExpectRankSets(ref->sets[step], t.sets[step], r, c.size, static_cast<int>(step));
      const IndexSets& s = t.sets[step];
      for (int32_t q = 0; q < s.n_seqs; ++q) pruned = pruned || s.Positions(q, 0).size() < size_t(s.seq_len[q]);
    }
    if (c.offload_to >= 0) {
      EXPECT_GT(t.stats.elastic.rows_loaded, 0) << "rank " << r << " loaded nothing";
    }
  }
  EXPECT_TRUE(pruned) << "no set was smaller than its past: selection did not prune";
}

INSTANTIATE_TEST_SUITE_P(
    Tp, SparseSharedGpu,
    ::testing::Values(SparseCase{"tiny_gqa_tp2", false, 2}, SparseCase{"stories_tp2", true, 2},
                      SparseCase{"stories_tp4", true, 4},
                      SparseCase{"stories_tp4_offloaded", true, 4, SelectionMode::kHeadLevel, 2},
                      SparseCase{"stories_tp2_batch_level_offloaded", true, 2, SelectionMode::kBatchLevel, 3}),
    [](const auto& info) { return info.param.name; });

// The runtime of `--backend cuda --tensor-parallel 2 --tensor-parallel-devices shared` on the tiny model.
RuntimeOptions SharedTp2Options() {
  RuntimeOptions o;
  o.model_path = SPECONTEXT_TEST_DATA "/tiny/tiny-llama";
  o.backend = "cuda";
  o.tensor_parallel = 2;
  o.tensor_parallel_devices = TensorParallelDevices::kShared;
  return o;
}

TEST(TensorParallelRuntime, SharedDevicesLoadEveryRankOnGpuZero) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  const RuntimeOptions o = SharedTp2Options();
  const int64_t free_before = CudaDeviceFreeBytes(0);
  absl::StatusOr<Runtime> rt = LoadRuntime(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  ASSERT_EQ(rt->tp_comms.size(), 2u);
  ASSERT_EQ(rt->tp_backends.size(), 1u);
  for (Backend* b : {rt->backend.get(), rt->tp_backends[0].get()}) {
    EXPECT_EQ(b->device(), DeviceKind::kCuda);
    EXPECT_NE(b->name().find("cuda:0"), std::string::npos) << b->name();
    // Each rank gets half of the GPU's free memory as its limit: the two never count the same bytes.
    EXPECT_LE(b->available_bytes(), free_before / 2) << b->name();
  }
  EXPECT_EQ(rt->model->config().num_key_value_heads * 2, rt->checkpoint.config.num_key_value_heads);
}

TEST(TensorParallelRuntime, SharedDevicesEnginesSampleTheSameTokens) {
  // What `specontext generate --backend cuda --tensor-parallel 2 --tensor-parallel-devices shared` does: an engine
  // per rank on its own thread, sampling on the device from its own logits; the ranks' logits are the same bits,
  // so they sample the same tokens.
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  const RuntimeOptions o = SharedTp2Options();
  absl::StatusOr<Runtime> rt = LoadRuntime(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  GenerationRequest req;
  req.prompt = TpPrompt(9, rt->checkpoint.config.vocab_size);
  req.max_new_tokens = 24;
  req.ignore_eos = true;
  req.sampling.temperature = 0.9f;
  req.sampling.top_k = 40;
  req.sampling.seed = 5;
  std::vector<Transformer*> models = {rt->model.get(), rt->tp_models[0].get()};
  std::vector<absl::StatusOr<GenerationResult>> got(2, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      if (absl::Status s = models[r]->backend()->MakeCurrent(); !s.ok()) {
        got[r] = s;
      } else {
        Engine engine(models[r], nullptr, EngineOptions{});
        got[r] = engine.Generate(req);
      }
      rt->tp_comms[r]->Abort();  // a rank that is done must not leave the other waiting
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status();
  EXPECT_EQ(got[0]->tokens.size(), 24u);
  EXPECT_EQ(got[1]->tokens, got[0]->tokens);
}

TEST(TensorParallelRuntime, RefusesMoreRanksThanGpus) {
  const int gpus = CudaDeviceCount();
  if (gpus == 0) GTEST_SKIP() << "no CUDA device";
  RuntimeOptions o;
  o.model_path = SPECONTEXT_TEST_DATA "/tiny/tiny-llama";
  o.backend = "cuda";
  o.tensor_parallel = gpus + 1;
  absl::StatusOr<Runtime> rt = LoadRuntime(o);
  ASSERT_TRUE(absl::IsInvalidArgument(rt.status())) << rt.status();
  EXPECT_NE(rt.status().message().find("--tensor-parallel-devices shared"), std::string::npos) << rt.status();
}

}  // namespace
}  // namespace specontext::testing
