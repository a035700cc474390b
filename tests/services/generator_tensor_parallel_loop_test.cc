// The generator's engine loop under tensor parallelism, in process (stories260K split over 2 CPU ranks):
// requests submitted and cancelled from other threads run in lockstep and leave no state on any rank; ranks
// made to diverge on purpose (other engine options, a cancellation on one rank only) fail the group cleanly:
// the requests in flight finish with INTERNAL, later submissions are refused, and no rank hangs.
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/model/engine.h"
#include "core/runtime/runtime.h"
#include "generator/engine_loop.h"
#include "generator/tensor_parallel_ranks.h"

namespace specontext::generator {
namespace {

// Members in construction order; destroyed loop first, runtime last.
struct Group {
  Runtime rt;
  std::unique_ptr<Engine> rank0;
  std::unique_ptr<Engine> rank1;
  std::unique_ptr<TensorParallelRanks> ranks;
  std::unique_ptr<EngineLoop> loop;
};

std::unique_ptr<Group> MakeGroup(const EngineOptions& eo0, const EngineOptions& eo1) {
  RuntimeOptions ro;
  ro.model_path = SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin";
  ro.tokenizer_path = SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin";
  ro.backend = "cpu";
  ro.threads = 1;
  ro.tensor_parallel = 2;
  absl::StatusOr<Runtime> rt = LoadRuntime(ro);
  EXPECT_TRUE(rt.ok()) << rt.status();
  if (!rt.ok()) return nullptr;
  auto g = std::make_unique<Group>();
  g->rt = *std::move(rt);
  g->rank0 = std::make_unique<Engine>(g->rt.model.get(), g->rt.tokenizer.get(), eo0);
  g->rank1 = std::make_unique<Engine>(g->rt.tp_models[0].get(), g->rt.tokenizer.get(), eo1);
  g->ranks = std::make_unique<TensorParallelRanks>(std::vector<Engine*>{g->rank1.get()},
                                                   std::vector<Communicator*>{g->rt.tp_comms[0].get(),
                                                                              g->rt.tp_comms[1].get()});
  g->loop = std::make_unique<EngineLoop>(g->rank0.get(), g->rt.backend.get(), nullptr, g->ranks.get());
  g->loop->Start();
  return g;
}

// What a client sees of one request (callbacks run on the loop thread).
struct Client {
  absl::Mutex mu;
  std::vector<int32_t> tokens;
  bool done = false;
  FinishReason reason = FinishReason::kNone;
  absl::Status status;
  StreamCallback Callback() {
    return [this](const StreamEvent& ev) {
      absl::MutexLock lock(&mu);
      if (ev.token >= 0) tokens.push_back(ev.token);
      if (ev.done) {
        done = true;
        reason = ev.reason;
        status = ev.status;
      }
    };
  }
  bool WaitDone(absl::Duration timeout) {
    absl::MutexLock lock(&mu);
    return mu.AwaitWithTimeout(absl::Condition(&done), timeout);
  }
  size_t Count() {
    absl::MutexLock lock(&mu);
    return tokens.size();
  }
};

GenerationRequest Request(Group& g, const std::string& prompt, int max_new) {
  GenerationRequest r;
  absl::StatusOr<std::vector<int32_t>> ids = EncodePrompt(g.rt, prompt);
  EXPECT_TRUE(ids.ok());
  r.prompt = *ids;
  r.max_new_tokens = max_new;
  r.ignore_eos = true;
  return r;
}

TEST(GeneratorTensorParallelLoop, LockstepServesCancelsAndFreesEveryRank) {
  EngineOptions eo;
  eo.max_batch = 4;
  eo.max_kv_bytes = 1 << 20;
  std::unique_ptr<Group> g = MakeGroup(eo, eo);
  ASSERT_NE(g, nullptr);
  Client a, b, c;
  absl::StatusOr<uint64_t> ia = g->loop->Submit(Request(*g, "Once upon a time", 30), a.Callback());
  absl::StatusOr<uint64_t> ib = g->loop->Submit(Request(*g, "Lily saw a big dog", 400), b.Callback());
  absl::StatusOr<uint64_t> ic = g->loop->Submit(Request(*g, "The sun was", 40), c.Callback());
  ASSERT_TRUE(ia.ok() && ib.ok() && ic.ok());
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  while (b.Count() < 5 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  g->loop->Cancel(*ib);
  for (Client* cl : {&a, &b, &c}) ASSERT_TRUE(cl->WaitDone(absl::Seconds(60)));
  EXPECT_EQ(a.reason, FinishReason::kLength);
  EXPECT_EQ(a.tokens.size(), 30u);
  EXPECT_EQ(c.tokens.size(), 40u);
  EXPECT_EQ(b.reason, FinishReason::kCancelled);
  EXPECT_LT(b.tokens.size(), 400u);
  EXPECT_FALSE(g->loop->failed());
  g->loop->Stop();
  for (Engine* e : {g->rank0.get(), g->rank1.get()}) {
    EXPECT_FALSE(e->HasWork());
    EXPECT_EQ(e->running(), 0);
    EXPECT_EQ(e->reserved_kv_bytes(), 0);
  }
}

// Rank 1 cuts prompts into chunks of 3 tokens, rank 0 takes them whole: their forwards differ in shape, the
// all-reduce refuses on both ranks and the group fails.
TEST(GeneratorTensorParallelLoop, RanksWithOtherBatchesFailTheGroup) {
  EngineOptions eo0, eo1;
  eo1.max_tokens_per_step = 3;
  std::unique_ptr<Group> g = MakeGroup(eo0, eo1);
  ASSERT_NE(g, nullptr);
  Client a;
  ASSERT_TRUE(g->loop->Submit(Request(*g, "Once upon a time there was a girl", 20), a.Callback()).ok());
  ASSERT_TRUE(a.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(a.reason, FinishReason::kError);
  EXPECT_EQ(a.status.code(), absl::StatusCode::kInternal) << a.status;
  EXPECT_TRUE(g->loop->failed());
  Client later;
  absl::StatusOr<uint64_t> refused = g->loop->Submit(Request(*g, "Hello", 5), later.Callback());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
}

// Rank 1 alone drops a request: it then runs no forward while rank 0 waits in an all-reduce. Its step fence
// meets that all-reduce, both fail, and the group is aborted instead of rank 0 waiting forever.
TEST(GeneratorTensorParallelLoop, RankThatLeavesTheStepDoesNotHangTheOthers) {
  EngineOptions eo;
  std::unique_ptr<Group> g = MakeGroup(eo, eo);
  ASSERT_NE(g, nullptr);
  Client a;
  absl::StatusOr<uint64_t> id = g->loop->Submit(Request(*g, "Once upon a time", 400), a.Callback());
  ASSERT_TRUE(id.ok());
  g->rank1->Cancel(*id);  // behind the loop's back: rank 1 only
  ASSERT_TRUE(a.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(a.reason, FinishReason::kError);
  EXPECT_EQ(a.status.code(), absl::StatusCode::kInternal) << a.status;
  EXPECT_TRUE(g->loop->failed());
  g->loop->Stop();
  for (Engine* e : {g->rank0.get(), g->rank1.get()}) EXPECT_FALSE(e->HasWork());
}

// A submission one rank refuses and the other takes (rank 1 with a smaller KV budget) fails the group too.
TEST(GeneratorTensorParallelLoop, SubmissionTheRanksAnswerDifferentlyFailsTheGroup) {
  EngineOptions eo0, eo1;
  eo1.max_kv_bytes = 1;
  std::unique_ptr<Group> g = MakeGroup(eo0, eo1);
  ASSERT_NE(g, nullptr);
  Client a;
  ASSERT_TRUE(g->loop->Submit(Request(*g, "Once upon a time", 10), a.Callback()).ok());
  ASSERT_TRUE(a.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(a.status.code(), absl::StatusCode::kInternal) << a.status;
  EXPECT_TRUE(g->loop->failed());
}

}  // namespace
}  // namespace specontext::generator
