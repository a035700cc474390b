// End to end: specontext-generator --tensor-parallel N (CPU backend, one thread, shard and engine per rank)
// serves concurrent greedy requests (and a sampled one) with the text of --tensor-parallel 1, dense and sparse (a random layer
// head with a budget below the pasts, with a kvstore segment); a request cancelled mid-stream leaves the others' text unchanged and
// frees its state (every rank's: the ranks' running and queued counts are compared after each step, and a
// later request still runs); the weak-retrieval fallback gives the text of one rank; bad values fail at startup
// naming the flag.
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <grpcpp/client_context.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/services/kvstore_segment.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

// stories260K: 8 attention heads over 4 KV heads, intermediate size 172: splits 2 and 4 ways, not 3.
const char* const kPrompts[] = {
    "Once upon a time", "Lily saw a big dog in the park", "The sun was", "Tom and his mom went to",
    "One day, a little bird", "There was a happy girl named Sue. She"};

class GeneratorTensorParallel : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ModelDir();
    if (dir_.empty()) GTEST_FAIL() << "stories260K not found in models/";
  }
  std::vector<std::string> Args(int tp, std::vector<std::string> extra = {}) const {
    std::vector<std::string> a = {"--model", dir_ + "/stories260K.bin", "--tokenizer", dir_ + "/tok512.bin",
                                  "--backend", "cpu", "--threads", "1", "--log-level", "warning",
                                  "--max-batch", "8", "--tensor-parallel", std::to_string(tp)};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static std::vector<v1::GenerateRequest> Requests() {
    std::vector<v1::GenerateRequest> reqs;
    int i = 0;
    for (const char* p : kPrompts) {
      v1::GenerateRequest req;
      req.set_prompt(p);
      req.set_max_new_tokens(24 + 9 * i++);
      req.set_ignore_eos(true);
      if (i == 2) {  // one sampled request: every rank draws from the request's seed
        req.mutable_sampling()->set_temperature(0.9f);
        req.mutable_sampling()->set_top_k(40);
        req.mutable_sampling()->set_seed(11);
      }
      reqs.push_back(req);
    }
    return reqs;
  }
  // Every request at once on `server`.
  static std::vector<StreamResult> Concurrent(const ServerProcess& server, const std::vector<v1::GenerateRequest>& reqs) {
    std::vector<StreamResult> out(reqs.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] {
        auto stub = GeneratorStub(server.address());
        out[i] = CallGenerate(stub.get(), reqs[i]);
      });
    }
    for (auto& t : threads) t.join();
    return out;
  }
  static void ExpectSame(const std::vector<StreamResult>& got, const std::vector<StreamResult>& want,
                         const std::vector<v1::GenerateRequest>& reqs, const std::string& what) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(want[i].status.ok()) << want[i].status.error_message();
      ASSERT_TRUE(got[i].status.ok()) << what << " request " << i << ": " << got[i].status.error_message();
      EXPECT_EQ(static_cast<int>(got[i].tokens.size()), reqs[i].max_new_tokens()) << what;
      EXPECT_EQ(got[i].tokens, want[i].tokens) << what << " prompt \"" << reqs[i].prompt() << "\"";
      EXPECT_EQ(got[i].text, want[i].text) << what;
    }
  }
  static double Metric(const ServerProcess& server, const std::string& name) {
    auto body = FetchMetrics(server.metrics_port());
    return body.ok() ? MetricValue(*body, name).value_or(-1) : -1;
  }

  std::string dir_;
};

TEST_F(GeneratorTensorParallel, DenseConcurrentGreedyEqualsOneRank) {
  const std::vector<v1::GenerateRequest> reqs = Requests();
  ServerProcess one;
  ASSERT_TRUE(one.Start(SPC_GENERATOR_BIN, Args(1)).ok());
  const std::vector<StreamResult> want = Concurrent(one, reqs);
  EXPECT_EQ(Metric(one, "spc_tensor_parallel_ranks"), 1);
  for (int tp : {2, 4}) {
    ServerProcess server;
    const absl::Status st = server.Start(SPC_GENERATOR_BIN, Args(tp));
    ASSERT_TRUE(st.ok()) << st;
    ExpectSame(Concurrent(server, reqs), want, reqs, absl::StrCat("--tensor-parallel ", tp));
    EXPECT_EQ(Metric(server, "spc_tensor_parallel_ranks"), tp);
    // The model's heads, not rank 0's shard.
    auto stub = GeneratorStub(server.address());
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    ASSERT_TRUE(stub->GetModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
    EXPECT_EQ(info.n_heads(), 8);
    EXPECT_EQ(info.n_kv_heads(), 4);
    ExpectGeneratorStateFreed(server.metrics_port());  // rank 0
  }
}

// A batch of 2 and prompt chunks of 5 tokens: requests wait in the queue and join while others decode, and
// prompts are prefilled over several steps, on every rank alike.
TEST_F(GeneratorTensorParallel, QueuedAndChunkedRequestsEqualOneRank) {
  const std::vector<std::string> small = {"--max-batch", "2", "--max-tokens-per-step", "5"};
  const std::vector<v1::GenerateRequest> reqs = Requests();
  ServerProcess one, two;
  ASSERT_TRUE(one.Start(SPC_GENERATOR_BIN, Args(1, small)).ok());
  ASSERT_TRUE(two.Start(SPC_GENERATOR_BIN, Args(2, small)).ok());
  ExpectSame(Concurrent(two, reqs), Concurrent(one, reqs), reqs, "--tensor-parallel 2, batch 2, chunks of 5");
  ExpectGeneratorStateFreed(two.metrics_port());  // rank 0
}

TEST_F(GeneratorTensorParallel, CancelMidStreamLeavesTheOthersAndFreesItsState) {
  const std::vector<v1::GenerateRequest> reqs = Requests();
  ServerProcess one, two;
  ASSERT_TRUE(one.Start(SPC_GENERATOR_BIN, Args(1)).ok());
  ASSERT_TRUE(two.Start(SPC_GENERATOR_BIN, Args(2)).ok());
  const std::vector<StreamResult> want = Concurrent(one, reqs);

  // A long request, cancelled by its client once tokens flow, while the others run beside it.
  std::vector<StreamResult> got;
  int cancelled_after = 0;
  grpc::Status cancelled_status;
  std::thread canceller([&] {
    auto stub = GeneratorStub(two.address());
    grpc::ClientContext ctx;
    v1::GenerateRequest req;
    req.set_prompt("Once upon a time there was a");
    req.set_max_new_tokens(400);
    req.set_ignore_eos(true);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      cancelled_after += resp.token_ids_size();
      if (cancelled_after >= 8) ctx.TryCancel();
    }
    cancelled_status = reader->Finish();
  });
  got = Concurrent(two, reqs);
  canceller.join();
  EXPECT_EQ(cancelled_status.error_code(), grpc::StatusCode::CANCELLED) << cancelled_status.error_message();
  EXPECT_GE(cancelled_after, 8);
  EXPECT_LT(cancelled_after, 400);
  ExpectSame(got, want, reqs, "--tensor-parallel 2 beside a cancelled request");
  ExpectGeneratorStateFreed(two.metrics_port());  // rank 0
  // Every rank dropped it: ranks whose running or queued counts differed would have failed the group.
  EXPECT_EQ(Metric(two, "spc_generator_engine_step_errors_total"), 0);
  ExpectSame(Concurrent(two, {reqs[0]}), {want[0]}, {reqs[0]}, "--tensor-parallel 2 after the cancellation");
}

TEST_F(GeneratorTensorParallel, SparseConcurrentGreedyEqualsOneRank) {
  std::mt19937 rng(std::random_device{}());
  const std::string head = WriteRandomHead(rng);
  RemoveOnExit cleanup{head};
  const std::vector<std::string> sparse = {"--retriever", "inproc", "--retrieval-head", head, "--budget", "4",
                                           "--sink", "1"};
  const std::vector<v1::GenerateRequest> reqs = Requests();
  ServerProcess one, two;
  ASSERT_TRUE(one.Start(SPC_GENERATOR_BIN, Args(1, sparse)).ok());
  // Rank 0's host KV tier in a kvstore segment, the other rank's in its own memory.
  SegmentGuard segment("spc_tp_test_");
  std::vector<std::string> with_kvstore = sparse;
  for (const std::string& a : {std::string("--kvstore"), segment.name, std::string("--kvstore-blocks"),
                               std::string("256"), std::string("--kvstore-block-bytes"), std::string("1KiB")}) {
    with_kvstore.push_back(a);
  }
  const absl::Status st = two.Start(SPC_GENERATOR_BIN, Args(2, with_kvstore));
  ASSERT_TRUE(st.ok()) << st;
  const std::vector<StreamResult> want = Concurrent(one, reqs);
  const std::vector<StreamResult> got = Concurrent(two, reqs);
  ExpectSame(got, want, reqs, "sparse --tensor-parallel 2");
  for (const StreamResult& r : got) EXPECT_TRUE(r.final.sparsity().sparse());
  EXPECT_GT(Metric(two, "spc_sparse_decode_steps_total"), 0);
  ServerProcess four;
  ASSERT_TRUE(four.Start(SPC_GENERATOR_BIN, Args(4, sparse)).ok());
  ExpectSame(Concurrent(four, reqs), want, reqs, "sparse --tensor-parallel 4");
}

// --fallback-mass under TP: the ranks add their query heads' captured mass each step (one all-reduce), so
// the sequences that attend densely, and so the text, are those of one rank. The fallback counts sequence-steps
// per sequence (independent of how the concurrent requests were batched): the same total on both. Threshold 1
// (every sequence-step whose head kept less than all of its mass): the random head differs from run to run,
// so no lower threshold is sure to make any sequence weak (tensor_parallel_sparse_test covers thresholds that
// split the sequences).
TEST_F(GeneratorTensorParallel, SparseWeakRetrievalFallbackEqualsOneRank) {
  std::mt19937 rng(std::random_device{}());
  const std::string head = WriteRandomHead(rng);
  RemoveOnExit cleanup{head};
  const std::vector<std::string> sparse = {"--retriever", "inproc", "--retrieval-head", head, "--budget", "4",
                                           "--sink", "1", "--fallback-mass", "1"};
  const std::vector<v1::GenerateRequest> reqs = Requests();
  ServerProcess one, two;
  ASSERT_TRUE(one.Start(SPC_GENERATOR_BIN, Args(1, sparse)).ok());
  ASSERT_TRUE(two.Start(SPC_GENERATOR_BIN, Args(2, sparse)).ok());
  const std::vector<StreamResult> want = Concurrent(one, reqs);
  const std::vector<StreamResult> got = Concurrent(two, reqs);
  ExpectSame(got, want, reqs, "sparse --fallback-mass --tensor-parallel 2");
  const double weak = Metric(one, "spc_weak_retrieval_fallback_sequences_total");
  EXPECT_GT(weak, 0);
  EXPECT_EQ(Metric(two, "spc_weak_retrieval_fallback_sequences_total"), weak);
}

TEST_F(GeneratorTensorParallel, BadValuesFailAtStartupNamingTheFlag) {
  struct Case {
    std::vector<std::string> extra;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--tensor-parallel", "0"}, "--tensor-parallel"},
      {{"--tensor-parallel", "3"}, "--tensor-parallel 3: tensor parallelism 3 does not split the model's 4 KV heads"},
      {{"--tensor-parallel", "2", "--tensor-parallel-devices", "both"},
       "--tensor-parallel-devices expects separate or shared"},
      {{"--tensor-parallel", "2", "--retriever", "127.0.0.1:1"}, "--tensor-parallel needs --retriever none or inproc"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {"/bin/sh", "-c", "exec \"$@\" 2>&1", "sh", SPC_GENERATOR_BIN,
                                     "--listen", "127.0.0.1:0", "--metrics-port", "0"};
    for (const std::string& a : Args(1)) argv.push_back(a);
    argv.insert(argv.end(), c.extra.begin(), c.extra.end());  // the later --tensor-parallel/--backend win
    int code = -1;
    const std::string out = RunCommand(argv, &code);
    EXPECT_EQ(code, 1) << out;
    EXPECT_NE(out.find(c.message), std::string::npos) << out;
  }
}

}  // namespace
}  // namespace specontext::testing
