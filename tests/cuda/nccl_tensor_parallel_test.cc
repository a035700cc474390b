// NCCL tensor parallelism over the GPUs of one host (core/cuda/nccl_communicator.h): the all-reduce against
// the serial sum at odd sizes (f32 and bf16), identical on every rank; a TP = 2 Transformer (one thread and
// GPU per rank) against TP = 1 on one GPU over prefill and 16 decode steps fed the same tokens, and TP = every
// visible GPU likewise. Skips with fewer than two GPUs or when libnccl cannot be opened (compiled in CI, carried
// by the GPU bundle, run on a multi-GPU machine).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/cuda/nccl_communicator.h"
#include "core/io/weight_source.h"
#include "core/model/transformer.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/model/tensor_parallel_harness.h"

namespace specontext::testing {
namespace {

struct Group {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> comms;
};

// Why the NCCL tests cannot run here ("" when they can): fewer than two GPUs, or no libnccl to open.
std::string NcclSkipReason() {
  if (CudaDeviceCount() < 2) return "fewer than two CUDA devices";
  auto b = MakeCudaBackend({.device = 0});
  if (!b.ok()) return b.status().ToString();
  Backend* raw = b->get();
  const int device = 0;
  auto one = CreateNcclGroup({&raw, 1}, {&device, 1});
  if (!one.ok() && absl::IsFailedPrecondition(one.status())) return std::string(one.status().message());
  return "";
}

#define SPC_NCCL_OR_SKIP()                                        \
  if (const std::string why = NcclSkipReason(); !why.empty()) GTEST_SKIP() << why

// `size` CUDA backends on devices 0..size-1 and their NCCL group; empty when there are fewer GPUs.
Group MakeGroup(int size) {
  Group g;
  if (CudaDeviceCount() < size) return g;
  std::vector<Backend*> raw;
  std::vector<int> devices;
  for (int d = 0; d < size; ++d) {
    auto b = MakeCudaBackend({.device = d});
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return {};
    raw.push_back(b->get());
    devices.push_back(d);
    g.backends.push_back(*std::move(b));
  }
  auto comms = CreateNcclGroup(raw, devices);
  EXPECT_TRUE(comms.ok()) << comms.status();
  if (comms.ok()) g.comms = *std::move(comms);
  return g;
}

// Runs fn(rank) on one thread per rank with the rank's device current; a failing rank aborts the group.
void RunRanks(Group& g, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> st(g.comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < g.comms.size(); ++r) {
    threads.emplace_back([&, r] {
      cudaSetDevice(static_cast<int>(r));
      st[r] = fn(static_cast<int>(r));
      if (!st[r].ok()) g.comms[r]->Abort();
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t r = 0; r < st.size(); ++r) EXPECT_TRUE(st[r].ok()) << "rank " << r << ": " << st[r];
}

TEST(Nccl, AllReduceEqualsSerialSum) {
  SPC_NCCL_OR_SKIP();
  const int size = std::min(CudaDeviceCount(), 4);
  Group g = MakeGroup(size);
  ASSERT_EQ(g.comms.size(), static_cast<size_t>(size));
  std::mt19937 rng(FreshSeed());
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t n : {1, 17, 97, 2049, 65537}) {
      std::vector<Tensor> in;
      Tensor want = Tensor::HostEmpty(DType::kF32, {n});
      for (int r = 0; r < size; ++r) {
        in.push_back(RandomHost({n}, rng));  // bf16-representable
        for (int64_t i = 0; i < n; ++i) want.as<float>()[i] += in.back().as<float>()[i];
      }
      std::vector<Tensor> out(size);
      RunRanks(g, [&](int r) -> absl::Status {
        Backend& b = *g.backends[r];
        absl::StatusOr<Tensor> d = b.ToDevice(in[r], dtype, MemoryKind::kWorkspace);
        if (!d.ok()) return d.status();
        if (absl::Status s = g.comms[r]->AllReduceSum(&*d); !s.ok()) return s;
        if (absl::Status s = b.Synchronize(); !s.ok()) return s;
        out[r] = DeviceToF32(b, *d);
        return absl::OkStatus();
      });
      const double tol = dtype == DType::kF32 ? 1e-5 : 2e-2;
      ExpectClose(out[0], want, {tol, tol, tol}, absl::StrCat("all-reduce n=", n));
      for (int r = 1; r < size; ++r) {
        EXPECT_EQ(std::memcmp(out[r].data(), out[0].data(), out[0].nbytes()), 0) << "rank " << r << " n " << n;
      }
    }
  }
  RunRanks(g, [&](int r) { return g.comms[r]->Barrier(); });
}

TEST(Nccl, TransformerTp2MatchesOneGpu) {
  SPC_NCCL_OR_SKIP();
  auto ck = OpenCheckpoint(SPECONTEXT_TEST_DATA "/tiny/tiny-llama-tied-gqa");
  ASSERT_TRUE(ck.ok()) << ck.status();
  const int64_t vocab = ck->config.vocab_size;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 11; ++i) prompt.push_back(static_cast<int32_t>((7 * i * i + 3) % vocab));
  // TP = 1 on GPU 0: the logits of each step and its greedy tokens, fed to the TP run too.
  std::vector<Tensor> ref;
  std::vector<int32_t> fed;
  {
    SPC_GPU_OR_SKIP(backend);
    auto model = Transformer::Load(*ck, backend.get());
    ASSERT_TRUE(model.ok()) << model.status();
    auto kv = (*model)->AllocateKv(64).value();
    std::vector<int32_t> next = prompt;
    int32_t past = 0;
    for (int step = 0; step <= 16; ++step) {
      Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
      ForwardSeq s{next, past, kv.get()};
      ASSERT_TRUE((*model)->Forward({&s, 1}, false, &logits).ok());
      past += static_cast<int32_t>(next.size());
      fed.push_back(static_cast<int32_t>(std::max_element(logits.as<float>(), logits.as<float>() + vocab) -
                                         logits.as<float>()));
      next = {fed.back()};
      ref.push_back(logits);
    }
  }
  Group g = MakeGroup(2);
  ASSERT_EQ(g.comms.size(), 2u);
  std::vector<std::vector<Tensor>> got(2);
  RunRanks(g, [&](int r) -> absl::Status {
    auto model = Transformer::Load(*ck, g.backends[r].get(), {}, {r, 2, g.comms[r].get()});
    if (!model.ok()) return model.status();
    auto kv = (*model)->AllocateKv(64);
    if (!kv.ok()) return kv.status();
    std::vector<int32_t> next = prompt;
    int32_t past = 0;
    for (int step = 0; step <= 16; ++step) {
      Tensor logits = Tensor::HostEmpty(DType::kF32, {1, vocab});
      ForwardSeq s{next, past, kv->get()};
      if (absl::Status st = (*model)->Forward({&s, 1}, false, &logits); !st.ok()) return st;
      past += static_cast<int32_t>(next.size());
      next = {fed[step]};
      got[r].push_back(logits);
    }
    return absl::OkStatus();
  });
  ASSERT_EQ(got[0].size(), ref.size());
  for (size_t step = 0; step < ref.size(); ++step) {
    // bf16 activations: the partial sums round differently from the unsharded GEMMs.
    ExpectClose(got[0][step], ref[step], {3e-2, 3e-2, 2e-2}, absl::StrCat("TP 2 step ", step));
    EXPECT_EQ(std::memcmp(got[1][step].data(), got[0][step].data(), got[0][step].nbytes()), 0) << "step " << step;
  }
}

TEST(Nccl, TransformerOnEveryGpuMatchesOneGpu) {
  // TP = every visible GPU, on a random GQA model with one KV head per rank (tests/model/tensor_parallel_harness.h),
  // fed TP 1's greedy tokens: logits within bf16 tolerance, every rank's bit-identical.
  SPC_NCCL_OR_SKIP();
  const int size = CudaDeviceCount();
  ModelConfig c = Stories260kShape();
  c.num_key_value_heads = size;
  c.num_attention_heads = 2 * size;
  c.intermediate_size = 48 * size;
  const Checkpoint ck = RandomCheckpoint(c, 13);
  absl::StatusOr<TpTrace> ref;
  {
    SPC_GPU_OR_SKIP(backend);
    ref = RunTpRank(ck, backend.get(), {});
  }
  ASSERT_TRUE(ref.ok()) << ref.status();
  Group g = MakeGroup(size);
  ASSERT_EQ(g.comms.size(), static_cast<size_t>(size));
  std::vector<Backend*> backends;
  for (const auto& b : g.backends) backends.push_back(b.get());
  auto ranks = RunTpRanks(ck, backends, g.comms, &ref->tokens);
  for (int r = 0; r < size; ++r) ASSERT_TRUE(ranks[r].ok()) << "rank " << r << ": " << ranks[r].status();
  for (size_t step = 0; step < ref->logits.size(); ++step) {
    std::vector<float> want = ref->logits[step], got = ranks[0]->logits[step];
    ExpectClose(Tensor(got.data(), DType::kF32, {static_cast<int64_t>(got.size())}),
                Tensor(want.data(), DType::kF32, {static_cast<int64_t>(want.size())}), {3e-2, 3e-2, 2e-2},
                absl::StrCat("TP ", size, " step ", step));
    for (int r = 1; r < size; ++r) EXPECT_EQ(ranks[r]->logits[step], got) << "rank " << r << " step " << step;
  }
}

}  // namespace
}  // namespace specontext::testing
