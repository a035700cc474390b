// Split mode's device logits and step phases, in process (a Retriever service on loopback), on the tiny
// random checkpoint of tests/sparse_engine (3 layers, GQA 8/2), CPU:
//   1. RemoteSparseDecoder::ForwardDevice (what the engine calls when its backend samples on the device; the
//      CPU backend does not, so it is called here directly) gives the logits Forward gives, bit for bit, on
//      steps that mix prompt chunks and decode tokens in both orders (two passes whose rows are put back in
//      the step's order), with layers offloaded, past the budget (index sets from the retriever), for a layer
//      head and an EAGLE-3 head (hidden states captured on the device and streamed).
//   2. The phase counters of split steps advance with each step and appear in the generator's metrics text
//      (spc_split_step_seconds_total{phase}, spc_split_steps_total).
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "generator/remote_sparse_decoder.h"
#include "generator/sparse_metrics.h"
#include "tests/services/in_process_retriever.h"
#include "tests/services/service_harness.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

constexpr int32_t kBudget = 5, kCap = 96, kGpuLayers = 2;

absl::StatusOr<std::shared_ptr<generator::RemoteSparseDecoder>> Connect(Transformer* model, int port) {
  generator::RemoteSparseOptions ro;
  ro.address = absl::StrCat("127.0.0.1:", port);
  ro.budget = kBudget;
  ro.sink = 1;
  ro.step_deadline = absl::Seconds(10);
  ASSIGN_OR_RETURN(std::shared_ptr<generator::RemoteSparseDecoder> d,
                   generator::RemoteSparseDecoder::Create(model, ro));
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!d->path_stats().connected && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
  if (!d->path_stats().connected) return absl::DeadlineExceededError("the retriever never connected");
  RETURN_IF_ERROR(d->OffloadLayers(kGpuLayers));
  return d;
}

// One sequence of the schedule: its tokens (prompt, then greedy ones) and how many are in its KV.
struct Stream {
  uint64_t id;
  std::vector<int32_t> tokens;
  size_t cached = 0;
};

class SplitDeviceLogits : public ::testing::TestWithParam<bool> {};

TEST_P(SplitDeviceLogits, ForwardDeviceEqualsForwardOnMixedSteps) {
  const bool eagle3 = GetParam();
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  auto tiny = LoadTiny(13);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Tiny& t = **tiny;
  const ModelConfig& c = t.checkpoint.config;
  const int64_t vocab = c.vocab_size;
  const std::string head_dir = eagle3 ? WriteRandomEagle3Head(c, seed, absl::StrCat("split_device_", seed), 0.5f, 0.5f)
                                      : TinyFiles(13)->second;
  auto head = RetrievalHead::Load(head_dir, c, t.checkpoint.weights.get());
  ASSERT_TRUE(head.ok()) << head.status();
  ASSERT_EQ((*head)->fused_width() > 0, eagle3);
  auto ret = StartRetriever(head->get(), head_dir);
  ASSERT_NE(ret, nullptr);
  // Two decoders, each on its own session: `host` steps with Forward, `device` with ForwardDevice.
  auto host = Connect(t.model.get(), ret->port);
  auto device = Connect(t.model.get(), ret->port);
  ASSERT_TRUE(host.ok() && device.ok()) << host.status() << device.status();

  // A decodes from step 1 on while B's prompt arrives in chunks (mixed steps, B's chunk first or last), then
  // both decode.
  std::vector<Stream> streams = {{1, RandomPrompt(9, vocab, seed)}, {2, RandomPrompt(13, vocab, seed + 1)}};
  std::vector<std::unique_ptr<SequenceKv>> kv_host, kv_device;
  for (const Stream& s : streams) {
    auto a = (*host)->AllocateKv(s.id, kCap, kBudget);
    auto b = (*device)->AllocateKv(s.id, kCap, kBudget);
    ASSERT_TRUE(a.ok() && b.ok());
    kv_host.push_back(*std::move(a));
    kv_device.push_back(*std::move(b));
  }
  // Per step: the streams in the step's order and the new tokens each feeds (0: the rest of its tokens).
  struct Feed {
    size_t stream;
    size_t n;
  };
  const std::vector<std::vector<Feed>> schedule = {
      {{0, 0}},                 // A's whole prompt
      {{0, 0}, {1, 4}},         // A decodes, B's first chunk after it
      {{1, 5}, {0, 0}},         // B's second chunk before A's decode token
      {{0, 0}, {1, 0}},         // A decodes beside B's last chunk
  };
  int mixed = 0;
  for (int step = 0; step < 16; ++step) {
    const std::vector<Feed> feeds = step < static_cast<int>(schedule.size())
                                        ? schedule[step]
                                        : std::vector<Feed>{{static_cast<size_t>(step % 2), 0},
                                                            {static_cast<size_t>(1 - step % 2), 0}};
    std::vector<ForwardSeq> fh, fd;
    std::vector<SparseStepSeq> seqs;
    bool prompt = false, decode = false;
    for (const Feed& f : feeds) {
      Stream& s = streams[f.stream];
      const size_t n = f.n > 0 ? f.n : s.tokens.size() - s.cached;
      std::span<const int32_t> fresh(s.tokens.data() + s.cached, n);
      fh.push_back({fresh, static_cast<int32_t>(s.cached), kv_host[f.stream].get()});
      fd.push_back({fresh, static_cast<int32_t>(s.cached), kv_device[f.stream].get()});
      seqs.push_back({s.id, kBudget});
      (IsDecodeRow(fh.back()) ? decode : prompt) = true;
    }
    mixed += prompt && decode;
    Tensor a = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(feeds.size()), vocab});
    ASSERT_TRUE((*host)->Forward(fh, seqs, &a).ok()) << "step " << step;
    absl::StatusOr<Tensor> d = (*device)->ForwardDevice(fd, seqs);
    ASSERT_TRUE(d.ok()) << "step " << step << ": " << d.status();
    ASSERT_EQ(d->shape(), a.shape());
    Tensor b = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(feeds.size()), vocab});
    ASSERT_TRUE(t.backend->ToHost(*d, &b).ok());
    for (size_t r = 0; r < feeds.size(); ++r) {
      for (int64_t v = 0; v < vocab; ++v) {
        ASSERT_EQ(a.as<float>()[r * vocab + v], b.as<float>()[r * vocab + v])
            << "step " << step << " row " << r << " vocab " << v;
      }
    }
    // Each stream moves on by what it fed; one whose prompt is in appends its greedy token.
    for (size_t r = 0; r < feeds.size(); ++r) {
      Stream& s = streams[feeds[r].stream];
      s.cached += fh[r].tokens.size();
      if (s.cached == s.tokens.size()) {
        const float* lg = a.as<float>() + r * vocab;
        s.tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + vocab) - lg));
      }
    }
  }
  EXPECT_EQ(mixed, 3);
  const generator::RetrievalPathStats ph = (*host)->path_stats(), pd = (*device)->path_stats();
  EXPECT_GT(pd.remote_steps, 8);
  EXPECT_EQ(pd.remote_steps, ph.remote_steps);
  EXPECT_EQ(pd.fallback_steps, 0);
  EXPECT_EQ(ph.fallback_steps, 0);
  EXPECT_EQ((*device)->stats().sparse_steps, (*host)->stats().sparse_steps);
  EXPECT_GT((*device)->stats().elastic.rows_loaded, 0);  // the offloaded layer read its slots
  for (const Stream& s : streams) {
    (*host)->Release(s.id);
    (*device)->Release(s.id);
  }
}

INSTANTIATE_TEST_SUITE_P(Heads, SplitDeviceLogits, ::testing::Bool(),
                         [](const auto& info) { return std::string(info.param ? "Eagle3" : "Layer"); });

TEST(SplitStepPhases, CountersAdvanceAndAppearInMetrics) {
  auto tiny = LoadTiny(13);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Tiny& t = **tiny;
  const ModelConfig& c = t.checkpoint.config;
  const std::string head_dir = TinyFiles(13)->second;
  auto ret = StartRetriever(t.head.get(), head_dir);
  ASSERT_NE(ret, nullptr);
  auto dec = Connect(t.model.get(), ret->port);
  ASSERT_TRUE(dec.ok()) << dec.status();
  metrics::Registry registry;
  auto m = generator::RegisterSparseMetrics(&registry);
  ASSERT_TRUE(m.ok()) << m.status();
  // Before any step: every phase is exported, at 0.
  m->Update((*dec)->stats(), (*dec)->path_stats());
  std::string text = registry.Serialize();
  for (const auto& [phase, secs] : generator::SplitStepSeconds{}.Phases()) {
    EXPECT_EQ(MetricValue(text, absl::StrCat("spc_split_step_seconds_total{phase=\"", phase, "\"}")).value_or(-1), 0)
        << phase;
  }
  EXPECT_EQ(MetricValue(text, "spc_split_steps_total").value_or(-1), 0);
  EXPECT_EQ(generator::SplitStepSummary((*dec)->path_stats().step_seconds), "steps=0");

  auto kv = (*dec)->AllocateKv(1, kCap, kBudget);
  ASSERT_TRUE(kv.ok());
  std::vector<int32_t> tokens = RandomPrompt(12, c.vocab_size, 3);
  const SparseStepSeq seq{1, kBudget};
  size_t cached = 0;
  double last_total = 0;
  constexpr int kSteps = 6;
  for (int step = 0; step < kSteps; ++step) {
    std::span<const int32_t> fresh(tokens.data() + cached, tokens.size() - cached);
    ForwardSeq f{fresh, static_cast<int32_t>(cached), kv->get()};
    Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
    ASSERT_TRUE((*dec)->Forward({&f, 1}, {&seq, 1}, &logits).ok());
    cached = tokens.size();
    const float* lg = logits.as<float>();
    tokens.push_back(static_cast<int32_t>(std::max_element(lg, lg + c.vocab_size) - lg));
    const generator::SplitStepSeconds s = (*dec)->path_stats().step_seconds;
    EXPECT_EQ(s.steps, step + 1);
    EXPECT_GT(s.total, last_total);
    last_total = s.total;
  }
  const generator::RetrievalPathStats r = (*dec)->path_stats();
  ASSERT_EQ(r.remote_steps, kSteps - 1);  // the prompt step selects nothing
  const generator::SplitStepSeconds& s = r.step_seconds;
  for (double phase : {s.plan_layers, s.observe, s.select_wait, s.selection, s.elastic_plan, s.forward, s.apply}) {
    EXPECT_GT(phase, 0);
  }
  EXPECT_EQ(s.features, 0);  // a layer head captures nothing
  double named = 0;
  for (const auto& [phase, secs] : s.Phases()) named += secs;
  EXPECT_NEAR(named, s.total, 1e-9);

  m->Update((*dec)->stats(), r);
  text = registry.Serialize();
  EXPECT_EQ(MetricValue(text, "spc_split_steps_total").value_or(-1), kSteps);
  for (const auto& [phase, secs] : s.Phases()) {
    EXPECT_NEAR(MetricValue(text, absl::StrCat("spc_split_step_seconds_total{phase=\"", phase, "\"}")).value_or(-1),
                secs, 1e-9 + 1e-6 * secs)
        << phase;
  }
  EXPECT_THAT(generator::SplitStepSummary(s),
              ::testing::AllOf(::testing::HasSubstr(absl::StrCat("steps=", kSteps)),
                               ::testing::HasSubstr("select_wait_ms="), ::testing::HasSubstr("other_ms=")));
  (*dec)->Release(1);
}

}  // namespace
}  // namespace specontext::testing
