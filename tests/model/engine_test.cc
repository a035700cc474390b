// Continuous batching gives each request the tokens it would get alone; bad requests are refused.
#include "core/model/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "tests/model/random_model.h"

namespace specontext {
namespace {

struct EngineFixture : ::testing::Test {
  void SetUp() override {
    backend = MakeCpuBackend();
    ModelConfig c = testing::TinyConfig();
    c.eos_token_ids = {};  // random weights: never stop early
    Checkpoint ck = testing::RandomCheckpoint(c, 11);
    model = std::move(Transformer::Load(ck, backend.get())).value();
  }
  GenerationRequest Request(std::vector<int32_t> prompt, int max_new, float temperature = 0, uint64_t seed = 0) {
    GenerationRequest r;
    r.prompt = std::move(prompt);
    r.max_new_tokens = max_new;
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    return r;
  }
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
};

TEST_F(EngineFixture, ConcurrentRequestsEqualSingleRuns) {
  std::vector<GenerationRequest> reqs = {Request({1, 5, 9}, 12), Request({3}, 7),
                                         Request({4, 4, 4, 4, 4, 4, 4, 8, 30, 60}, 15),
                                         Request({7, 8}, 10, 0.9f, 42)};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& r : reqs) {
    Engine e(model.get(), nullptr, EngineOptions{});
    alone.push_back(e.Generate(r).value().tokens);
    EXPECT_EQ(static_cast<int>(alone.back().size()), r.max_new_tokens);
  }
  EngineOptions opts;
  opts.max_batch = 3;          // the fourth request waits for a free slot
  opts.max_tokens_per_step = 4; // prompts are prefilled in chunks beside decodes
  Engine engine(model.get(), nullptr, opts);
  std::vector<std::vector<int32_t>> got(reqs.size());
  std::vector<bool> done(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(engine.Submit(reqs[i], [&, i](const StreamEvent& ev) {
                        if (ev.token >= 0) got[i].push_back(ev.token);
                        if (ev.done) {
                          done[i] = true;
                          EXPECT_EQ(ev.reason, FinishReason::kLength);
                          EXPECT_EQ(ev.stats.generated_tokens, reqs[i].max_new_tokens);
                        }
                      }).ok());
  }
  int steps = 0;
  while (engine.HasWork()) {
    ASSERT_TRUE(engine.Step().ok());
    ASSERT_LE(engine.running(), 3);
    ASSERT_LT(++steps, 1000);
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(done[i]);
    EXPECT_EQ(got[i], alone[i]) << "request " << i;
  }
}

TEST_F(EngineFixture, ReportsPrefillProgressPerChunk) {
  EngineOptions opts;
  opts.max_tokens_per_step = 4;
  std::vector<std::pair<int32_t, int32_t>> seen;
  opts.prefill_progress = [&](uint64_t, int32_t done, int32_t total) { seen.emplace_back(done, total); };
  Engine e(model.get(), nullptr, opts);
  ASSERT_TRUE(e.Generate(Request(std::vector<int32_t>(10, 3), 3)).ok());
  EXPECT_EQ(seen, (std::vector<std::pair<int32_t, int32_t>>{{4, 10}, {8, 10}, {10, 10}}));
}

// Batch-invariant mode: a prompt is never cut into a one-token chunk (the backend would run that token as a
// decoding row), whatever the other prompts leave of a step's budget; the tokens stay those of single runs.
TEST_F(EngineFixture, BatchInvariantModeCutsNoOneTokenPromptChunk) {
  ASSERT_TRUE(backend->set_batch_invariant(true).ok());
  const std::vector<GenerationRequest> reqs = {Request(std::vector<int32_t>(9, 3), 4), Request({5, 6, 7, 8, 9}, 4),
                                               Request({11, 12}, 4), Request({13}, 4)};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& r : reqs) {
    Engine e(model.get(), nullptr, EngineOptions{});
    alone.push_back(e.Generate(r).value().tokens);
  }
  EngineOptions opts;
  opts.max_tokens_per_step = 4;
  std::map<uint64_t, std::vector<int32_t>> done_by_id;  // cumulative prefilled tokens per request, per chunk
  opts.prefill_progress = [&](uint64_t id, int32_t done, int32_t) { done_by_id[id].push_back(done); };
  Engine engine(model.get(), nullptr, opts);
  std::vector<std::vector<int32_t>> got(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(engine.Submit(reqs[i], [&, i](const StreamEvent& ev) {
                        if (ev.token >= 0) got[i].push_back(ev.token);
                      }).ok());
  }
  for (int steps = 0; engine.HasWork(); ++steps) {
    ASSERT_TRUE(engine.Step().ok());
    ASSERT_LT(steps, 1000);
  }
  ASSERT_EQ(done_by_id.size(), reqs.size());
  for (const auto& [id, done] : done_by_id) {
    for (size_t c = 0; c < done.size(); ++c) {
      const int32_t chunk = done[c] - (c == 0 ? 0 : done[c - 1]);
      EXPECT_TRUE(chunk > 1 || done.back() == 1) << "request " << id << " chunk " << c << " of one token";
    }
  }
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(got[i], alone[i]) << "request " << i;
  ASSERT_TRUE(backend->set_batch_invariant(false).ok());
}

TEST_F(EngineFixture, StopTokenAndCancel) {
  Engine e(model.get(), nullptr, EngineOptions{});
  const auto free_run = e.Generate(Request({1, 2, 3}, 8)).value().tokens;
  GenerationRequest r = Request({1, 2, 3}, 8);
  r.stop_token_ids = {free_run[3]};
  auto stopped = e.Generate(r).value();
  EXPECT_EQ(stopped.reason, FinishReason::kStopToken);
  const auto first = std::find(free_run.begin(), free_run.end(), free_run[3]) - free_run.begin();
  EXPECT_EQ(static_cast<int64_t>(stopped.tokens.size()), first + 1);

  FinishReason reason = FinishReason::kNone;
  int tokens = 0;
  auto id = e.Submit(Request({1, 2, 3}, 50), [&](const StreamEvent& ev) {
    if (ev.token >= 0) ++tokens;
    if (ev.done) reason = ev.reason;
  });
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(e.Step().ok());
  ASSERT_TRUE(e.Step().ok());
  e.Cancel(*id);
  while (e.HasWork()) ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(reason, FinishReason::kCancelled);
  EXPECT_EQ(tokens, 2);
  EXPECT_EQ(backend->memory_report().bytes[static_cast<size_t>(MemoryKind::kKvCache)], 0);
}

TEST_F(EngineFixture, CancellingAQueuedRequestFinishesItAtTheNextStep) {
  EngineOptions opts;
  opts.max_batch = 1;  // the second request waits behind the first
  Engine e(model.get(), nullptr, opts);
  FinishReason first = FinishReason::kNone, second = FinishReason::kNone;
  auto a = e.Submit(Request({1, 2}, 40), [&](const StreamEvent& ev) {
    if (ev.done) first = ev.reason;
  });
  auto b = e.Submit(Request({3, 4}, 40), [&](const StreamEvent& ev) {
    if (ev.done) {
      second = ev.reason;
      e.Cancel(12345);  // callbacks may call back into the engine
    }
  });
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(e.queued(), 1);
  e.Cancel(*b);
  ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(second, FinishReason::kCancelled);
  EXPECT_EQ(first, FinishReason::kNone);  // still running
  EXPECT_EQ(e.queued(), 0);
  while (e.HasWork()) ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(first, FinishReason::kLength);
}

// Admission is round-robin by client: a client flooding the queue does not make another wait for all
// of its requests (counted in engine steps and finished requests, never in time).
TEST_F(EngineFixture, AdmissionIsRoundRobinByClient) {
  EngineOptions opts;
  opts.max_batch = 2;
  Engine e(model.get(), nullptr, opts);
  constexpr int kFlood = 10;
  int flood_done = 0, flood_done_when_short_done = -1, short_first_step = -1, step = 0;
  for (int i = 0; i < kFlood; ++i) {
    GenerationRequest r = Request({1, 2, 3}, 20);
    r.client = "ipv4:10.0.0.1";
    ASSERT_TRUE(e.Submit(r, [&](const StreamEvent& ev) { flood_done += ev.done; }).ok());
  }
  ASSERT_TRUE(e.Step().ok());  // both slots go to the flood
  ++step;
  ASSERT_EQ(e.running(), 2);
  GenerationRequest brief = Request({4, 5}, 3);
  brief.client = "ipv4:10.0.0.2";
  ASSERT_TRUE(e.Submit(brief, [&](const StreamEvent& ev) {
                 if (ev.token >= 0 && short_first_step < 0) short_first_step = step;
                 if (ev.done) flood_done_when_short_done = flood_done;
               }).ok());
  while (e.HasWork()) {
    ASSERT_TRUE(e.Step().ok());
    ASSERT_LT(++step, 1000);
  }
  EXPECT_EQ(flood_done, kFlood);
  // The short request takes the first slot that frees (after the two flood requests admitted first),
  // not the slot after the whole flood (FIFO: 8 flood requests done before it).
  EXPECT_EQ(flood_done_when_short_done, 2);
  EXPECT_LE(short_first_step, 22) << "20 decode steps of the first two, then its own prompt";

  // Two clients flooding alternate at every admission (one slot).
  opts.max_batch = 1;
  Engine alt(model.get(), nullptr, opts);
  std::string order;
  for (int i = 0; i < 4; ++i) {
    for (const char* who : {"a", "a", "b"}) {  // a queues twice as many
      GenerationRequest r = Request({1, 2}, 2);
      r.client = who;
      ASSERT_TRUE(alt.Submit(r, [&order, who, first = true](const StreamEvent& ev) mutable {
                       if (ev.token >= 0 && first) order += who;
                       first = false;
                     }).ok());
    }
  }
  while (alt.HasWork()) ASSERT_TRUE(alt.Step().ok());
  EXPECT_EQ(order, "ababababaaaa");  // a, then b (never admitted), alternating while both wait
}

// max_running_per_client keeps batch slots open to other clients: a short request arriving while one
// client floods is admitted at the next step, before any flood request finishes.
TEST_F(EngineFixture, RunningCapPerClientKeepsSlotsForOthers) {
  EngineOptions opts;
  opts.max_batch = 4;
  opts.max_running_per_client = 3;
  Engine e(model.get(), nullptr, opts);
  int flood_done = 0, flood_done_when_short_done = -1, short_first_step = -1, step = 0;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r = Request({1, 2, 3}, 20);
    r.client = "flood";
    ASSERT_TRUE(e.Submit(r, [&](const StreamEvent& ev) { flood_done += ev.done; }).ok());
  }
  ASSERT_TRUE(e.Step().ok());
  ++step;
  EXPECT_EQ(e.running(), 3);  // the fourth slot stays free
  GenerationRequest brief = Request({4, 5}, 3);
  brief.client = "other";
  ASSERT_TRUE(e.Submit(brief, [&](const StreamEvent& ev) {
                 if (ev.token >= 0 && short_first_step < 0) short_first_step = step;
                 if (ev.done) flood_done_when_short_done = flood_done;
               }).ok());
  while (e.HasWork()) {
    ASSERT_TRUE(e.Step().ok());
    ASSERT_LE(e.running(), 4);
    ASSERT_LT(++step, 1000);
  }
  EXPECT_EQ(short_first_step, 1) << "admitted at the step after it arrived";
  EXPECT_EQ(flood_done_when_short_done, 0);
  EXPECT_EQ(flood_done, 8);
}

// Dense KV reservations are bounded by max_kv_bytes: a request that can never fit is refused at once,
// the others wait for memory instead of being allocated past the budget.
TEST_F(EngineFixture, KvBudgetRefusesWhatCannotFitAndQueuesTheRest) {
  const int64_t per_token = model->KvBytesPerToken();
  EngineOptions opts;
  opts.max_batch = 4;
  opts.max_kv_bytes = 30 * per_token;  // one request of 4 + 16 tokens at a time
  Engine e(model.get(), nullptr, opts);
  auto refused = e.Submit(Request({1, 2, 3, 4}, 40), {});
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("--max-kv-bytes"), std::string::npos) << refused.status();
  EXPECT_NE(refused.status().message().find("at most 30 tokens"), std::string::npos) << refused.status();
  int done = 0;
  for (int i = 0; i < 3; ++i) {
    auto id = e.Submit(Request({1, 2, 3, 4}, 16), [&](const StreamEvent& ev) {
      if (ev.done) {
        EXPECT_EQ(ev.reason, FinishReason::kLength);
        ++done;
      }
    });
    ASSERT_TRUE(id.ok()) << id.status();
  }
  int steps = 0;
  while (e.HasWork()) {
    ASSERT_TRUE(e.Step().ok());
    EXPECT_LE(e.running(), 1);
    EXPECT_LE(e.reserved_kv_bytes(), opts.max_kv_bytes);
    EXPECT_LE(backend->memory_report().bytes[static_cast<size_t>(MemoryKind::kKvCache)], opts.max_kv_bytes);
    ASSERT_LT(++steps, 1000);
  }
  EXPECT_EQ(done, 3);
  EXPECT_EQ(e.reserved_kv_bytes(), 0);
}

TEST_F(EngineFixture, SeededSamplingIsReproducible) {
  Engine e(model.get(), nullptr, EngineOptions{});
  auto a = e.Generate(Request({5}, 20, 1.0f, 9)).value().tokens;
  auto b = e.Generate(Request({5}, 20, 1.0f, 9)).value().tokens;
  auto c = e.Generate(Request({5}, 20, 1.0f, 10)).value().tokens;
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST_F(EngineFixture, RejectsBadRequests) {
  Engine e(model.get(), nullptr, EngineOptions{});
  auto code = [&](GenerationRequest r) { return e.Submit(std::move(r), {}).status().code(); };
  EXPECT_EQ(code(Request({}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({1, 97}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({1, -1}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request(std::vector<int32_t>(256, 1), 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({1}, 0)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({1}, 4, -1.0f)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({1}, 4, NAN)), absl::StatusCode::kInvalidArgument);
  GenerationRequest top_p = Request({1}, 4, 1.0f);
  top_p.sampling.top_p = 1.5f;
  EXPECT_EQ(code(top_p), absl::StatusCode::kInvalidArgument);
  top_p.sampling.top_p = 0.0f;
  EXPECT_EQ(code(top_p), absl::StatusCode::kInvalidArgument);
  GenerationRequest stops = Request({1}, 4);
  stops.stop_strings = {"x"};  // no tokenizer
  EXPECT_EQ(code(stops), absl::StatusCode::kInvalidArgument);
  // A huge max_new_tokens is clamped to the context, not refused.
  auto r = e.Generate(Request(std::vector<int32_t>(250, 3), 1 << 30));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tokens.size(), 6u);
  EXPECT_EQ(r->reason, FinishReason::kLength);
}

// EngineOptions::max_context below the model's context (256 here): prompts must leave room under it and
// max_new_tokens is clamped to it; the budget of a request is checked against it too.
TEST_F(EngineFixture, MaxContextCapsRequests) {
  EngineOptions o;
  o.max_context = 40;
  Engine e(model.get(), nullptr, o);
  const absl::Status too_long = e.Submit(Request(std::vector<int32_t>(40, 3), 4), {}).status();
  EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.message().find("max context is 40"), std::string::npos) << too_long;
  auto r = e.Generate(Request(std::vector<int32_t>(30, 3), 1000));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens.size(), 10u);
  EXPECT_EQ(r->reason, FinishReason::kLength);
  GenerationRequest big_budget = Request({1, 2}, 4);
  big_budget.budget = 41;
  EXPECT_EQ(e.Submit(big_budget, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

// Teacher forcing: the forced tokens are emitted whatever the logits say, every one a decode step whose
// logits equal those of one forward over the whole sequence, and a forced EOS does not end the request.
TEST_F(EngineFixture, TeacherForcingObservesTheLogitsOfEachStep) {
  const std::vector<int32_t> seq = {1, 17, 2, 40, 40, 3, 96, 0, 55};
  const int64_t vocab = model->config().vocab_size, n = static_cast<int64_t>(seq.size());
  auto kv = model->AllocateKv(static_cast<int32_t>(n)).value();
  Tensor all = Tensor::HostEmpty(DType::kF32, {n, vocab});
  ForwardSeq fs{seq, 0, kv.get()};
  ASSERT_TRUE(model->Forward({&fs, 1}, /*all_tokens=*/true, &all).ok());

  EngineOptions opts;
  Engine engine(model.get(), nullptr, opts);
  GenerationRequest r = Request({seq[0], seq[1]}, 100);
  r.forced_tokens.assign(seq.begin() + 2, seq.end());
  r.stop_token_ids = {40};
  std::vector<int32_t> indices;
  double worst = 0;
  r.logits_observer = [&](int32_t index, std::span<const float> logits) {
    indices.push_back(index);
    ASSERT_EQ(static_cast<int64_t>(logits.size()), vocab);
    const float* ref = all.as<float>() + (1 + index) * vocab;  // after tokens [0, 1 + index]
    for (int64_t v = 0; v < vocab; ++v) worst = std::max(worst, double(std::fabs(logits[v] - ref[v])));
  };
  absl::StatusOr<GenerationResult> res = engine.Generate(r);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->tokens, r.forced_tokens);
  EXPECT_EQ(res->reason, FinishReason::kLength);
  EXPECT_EQ(indices, std::vector<int32_t>({0, 1, 2, 3, 4, 5, 6}));
  EXPECT_LT(worst, 1e-4);

  GenerationRequest bad = Request({1}, 4);
  bad.forced_tokens = {3, static_cast<int32_t>(vocab)};
  EXPECT_TRUE(absl::IsInvalidArgument(engine.Submit(bad, nullptr).status()));
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  std::vector<float> logits = {0.1f, 2.0f, 1.9f, -3.0f};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    Sampler k1({1.0f, 1, 1.0f, seed});
    EXPECT_EQ(k1.Sample(logits), 1);
    Sampler p({1.0f, 0, 0.01f, seed});
    EXPECT_EQ(p.Sample(logits), 1);
  }
}

TEST(Sampler, TopPWidensPastTheFirstCandidatesOfAFlatDistribution) {
  std::vector<float> flat(5000, 0.25f);  // equal logits: the order is by id
  Sampler s({0.7f, 0, 0.5f, 3});
  int max_id = 0;
  for (int i = 0; i < 3000; ++i) {
    const int id = s.Sample(flat);
    ASSERT_LT(id, 2500);
    max_id = std::max(max_id, id);
  }
  EXPECT_GT(max_id, 1024);
}

TEST(Sampler, TopPAppliesWithinTopK) {
  std::vector<float> logits = {0.0f, std::log(2.0f), std::log(5.0f)};  // 1/8, 2/8, 5/8
  // top-2 leaves {5/7, 2/7}; top_p 0.6 keeps only the first.
  Sampler s({1.0f, 2, 0.6f, 8});
  for (int i = 0; i < 500; ++i) ASSERT_EQ(s.Sample(logits), 2);
}

TEST(Sampler, FrequenciesFollowSoftmax) {
  std::vector<float> logits = {0.0f, std::log(2.0f), std::log(5.0f)};  // probabilities 1/8, 2/8, 5/8
  Sampler s({1.0f, 0, 1.0f, 123});
  std::vector<int> counts(3);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits)];
  EXPECT_NEAR(counts[0] / double(n), 0.125, 0.01);
  EXPECT_NEAR(counts[1] / double(n), 0.25, 0.01);
  EXPECT_NEAR(counts[2] / double(n), 0.625, 0.01);
  // top_k = 2 removes the least likely token entirely.
  Sampler k2({1.0f, 2, 1.0f, 5});
  for (int i = 0; i < 2000; ++i) EXPECT_NE(k2.Sample(logits), 0);
}

// A device sampler is handed Sampler::NextUniform() and picks the kept token (top-k, then top-p) whose
// cumulative mass, walking the kept tokens in id order, first reaches u * kept mass: with the same seed that is the token
// Sample() picks, step after step (the GPU engine's seeded output follows the host's).
TEST(Sampler, NextUniformIsTheDrawSampleUses) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> val(-3.0f, 3.0f);
  for (const SamplingParams base : {SamplingParams{0.8f, 0, 1.0f, 0}, SamplingParams{1.3f, 7, 1.0f, 0},
                                    SamplingParams{1.0f, 0, 0.6f, 0}, SamplingParams{0.9f, 9, 0.8f, 0}}) {
    SamplingParams p = base;
    p.seed = rng();
    Sampler a(p), b(p);
    EXPECT_FALSE(a.greedy());
    int agree = 0;
    for (int step = 0; step < 200; ++step) {
      std::vector<float> logits(40);
      for (float& x : logits) x = val(rng);
      const int32_t want = a.Sample(logits);
      const double u = b.NextUniform();
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      // Reference pick from u: order by logit (ties to the lower id), cut by top-k then top-p.
      std::vector<int32_t> idx(logits.size());
      std::iota(idx.begin(), idx.end(), 0);
      std::sort(idx.begin(), idx.end(), [&](int32_t x, int32_t y) { return logits[x] > logits[y] || (logits[x] == logits[y] && x < y); });
      std::vector<double> pr;
      for (int32_t i : idx) pr.push_back(std::exp(double(logits[i]) / p.temperature));
      size_t keep = p.top_k > 0 ? std::min<size_t>(p.top_k, pr.size()) : pr.size();
      double mass = 0;
      for (size_t i = 0; i < keep; ++i) mass += pr[i];
      if (p.top_p < 1.0f) {
        double cum = 0;
        for (size_t i = 0; i < keep; ++i) {
          cum += pr[i];
          if (cum / mass >= p.top_p) {
            keep = i + 1;
            break;
          }
        }
        mass = 0;
        for (size_t i = 0; i < keep; ++i) mass += pr[i];
      }
      // The kept tokens are walked in id order.
      std::vector<std::pair<int32_t, double>> kept;
      for (size_t i = 0; i < keep; ++i) kept.push_back({idx[i], pr[i]});
      std::sort(kept.begin(), kept.end());
      double r = u * mass;
      int32_t got = kept.back().first;
      for (const auto& [id, q] : kept) {
        r -= q;
        if (r <= 0) {
          got = id;
          break;
        }
      }
      agree += got == want;
    }
    // u is rounded to float: a pick may differ only when the draw lands within ~1e-7 of a boundary.
    EXPECT_GE(agree, 199) << "T " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p;
  }
  EXPECT_TRUE(Sampler({0.0f, 0, 1.0f, 1}).greedy());
  EXPECT_TRUE(Sampler({1.0f, 1, 1.0f, 1}).greedy());
}

}  // namespace
}  // namespace specontext
