// The batch-invariant option on the CPU side: --batch-invariant parses into RuntimeOptions (off by default,
// false where a CLI does not define it, a bad value refused), a backend without the mode refuses it with a
// message naming the backend, and the CPU backend's mode gives every Linear row the bits it has alone (f32
// and bf16 weights, row counts on both sides of the GEMV/sgemm switch at 8 rows).
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cli/args.h"
#include "core/cpu/cpu_backend.h"
#include "core/runtime/runtime.h"
#include "gtest/gtest.h"

namespace specontext {
namespace {

absl::StatusOr<RuntimeOptions> Parse(std::vector<std::string> words, bool define = true) {
  Args args;
  args.Define({"model", "m"});
  args.Define({"tokenizer", "t"});
  args.Define({"backend", "b", false, false, "auto"});
  args.Define({"gpu-memory-limit", "g", false, false, "0"});
  args.Define({"threads", "t", false, false, "0"});
  DefineCudaGraphsFlag(args);
  if (define) DefineBatchInvariantFlag(args);
  words.insert(words.begin(), "prog");
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  absl::Status st = args.Parse(static_cast<int>(argv.size()), argv.data());
  if (!st.ok()) return st;
  return RuntimeOptionsFromArgs(args);
}

TEST(BatchInvariantOption, TheFlagParsesAndIsOffByDefault) {
  auto off = Parse({"--model", "x"});
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->batch_invariant);
  auto on = Parse({"--model", "x", "--batch-invariant"});
  ASSERT_TRUE(on.ok()) << on.status();
  EXPECT_TRUE(on->batch_invariant);
  auto explicit_off = Parse({"--model", "x", "--batch-invariant=false"});
  ASSERT_TRUE(explicit_off.ok()) << explicit_off.status();
  EXPECT_FALSE(explicit_off->batch_invariant);
  EXPECT_FALSE(Parse({"--model", "x", "--batch-invariant=maybe"}).ok());
  auto undefined = Parse({"--model", "x"}, /*define=*/false);
  ASSERT_TRUE(undefined.ok()) << undefined.status();
  EXPECT_FALSE(undefined->batch_invariant);
  EXPECT_FALSE(Parse({"--model", "x", "--batch-invariant"}, /*define=*/false).ok());  // unknown flag there
}

// A backend that keeps Backend's defaults for the mode.
class NoModeBackend : public CpuBackend {
 public:
  NoModeBackend() : CpuBackend(0) {}
  bool batch_invariant() const override { return Backend::batch_invariant(); }
  absl::Status set_batch_invariant(bool enabled) override { return Backend::set_batch_invariant(enabled); }
};

TEST(BatchInvariantOption, ABackendWithoutTheModeRefusesIt) {
  NoModeBackend b;
  EXPECT_TRUE(b.set_batch_invariant(false).ok());
  const absl::Status st = b.set_batch_invariant(true);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("cpu"), std::string::npos) << st;
  EXPECT_NE(st.message().find("batch-invariant"), std::string::npos) << st;
  EXPECT_FALSE(b.batch_invariant());
}

// Linear of the first n rows of x, as bytes per row.
std::vector<std::vector<char>> LinearRows(CpuBackend& b, const std::vector<float>& x, const Tensor& w, int64_t n,
                                          int64_t k) {
  Tensor xt = Tensor::HostEmpty(DType::kF32, {n, k});
  std::memcpy(xt.data(), x.data(), xt.nbytes());
  Tensor out = Tensor::HostEmpty(DType::kF32, {n, w.dim(0)});
  EXPECT_TRUE(b.Linear(xt, w, nullptr, &out).ok());
  std::vector<std::vector<char>> rows(n);
  const size_t rb = size_t(w.dim(0)) * 4;
  for (int64_t i = 0; i < n; ++i) rows[i].assign(static_cast<char*>(out.data()) + i * rb, static_cast<char*>(out.data()) + (i + 1) * rb);
  return rows;
}

TEST(BatchInvariantOption, CpuLinearRowsEqualTheirOneRowResult) {
  CpuBackend b(0);
  ASSERT_TRUE(b.set_batch_invariant(true).ok());
  EXPECT_TRUE(b.batch_invariant());
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-1, 1);
  const int64_t k = 203, m = 97, max_n = 40;
  std::vector<float> x(max_n * k);
  for (float& v : x) v = d(rng);
  Tensor wf = Tensor::HostEmpty(DType::kF32, {m, k});
  Tensor wb = Tensor::HostEmpty(DType::kBF16, {m, k});
  for (int64_t i = 0; i < m * k; ++i) {
    const float v = d(rng);
    wf.as<float>()[i] = v;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    wb.as<uint16_t>()[i] = static_cast<uint16_t>(bits >> 16);
  }
  for (const Tensor* w : {&wf, &wb}) {
    std::vector<std::vector<char>> alone;
    for (int64_t r = 0; r < max_n; ++r) {
      std::vector<float> one(x.begin() + r * k, x.begin() + (r + 1) * k);
      alone.push_back(LinearRows(b, one, *w, 1, k)[0]);
    }
    for (int64_t n : {1, 3, 8, 9, 33, 40}) {
      const auto rows = LinearRows(b, x, *w, n, k);
      for (int64_t r = 0; r < n; ++r) {
        EXPECT_EQ(rows[r], alone[r]) << (w == &wf ? "f32" : "bf16") << " weights, n " << n << ", row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace specontext
