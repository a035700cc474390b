// The real specontext-retriever on loopback with a freshly random retrieval head shaped for
// stories260K: index sets over the wire equal a direct head + SelectTopB computation, per-sequence
// errors keep the stream open, limits hold, and a cancelled stream frees its state. Once more with
// `--backend auto` (the head on a Backend: the CPU backend on a machine without a GPU), whose sets equal the
// direct computation up to near-ties.
#include <algorithm>
#include <filesystem>
#include <iterator>
#include <fstream>
#include <iostream>
#include <sstream>
#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>

#include "absl/time/clock.h"
#include "core/runtime/runtime.h"
#include "core/sparse/retrieval_head.h"
#include "core/sparse/selection.h"
#include "retriever/retriever_session.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

using Stream = grpc::ClientReaderWriter<v1::RetrieverRequest, v1::RetrieverResponse>;

v1::RetrieverRequest OpenReq(uint64_t id, int32_t max_tokens) {
  v1::RetrieverRequest r;
  r.mutable_open()->set_sequence_id(id);
  r.mutable_open()->set_max_tokens(max_tokens);
  return r;
}
v1::RetrieverRequest ObserveReq(uint64_t id, const std::vector<int32_t>& ids) {
  v1::RetrieverRequest r;
  r.mutable_observe()->set_sequence_id(id);
  r.mutable_observe()->mutable_token_ids()->Add(ids.begin(), ids.end());
  return r;
}

class RetrieverE2E : public ::testing::Test {
 protected:
  // Flags added to the server's command line.
  virtual std::vector<std::string> ExtraArgs() const { return {}; }

  void SetUp() override {
    rng_.seed(std::random_device{}());
    head_dir_ = WriteRandomHead(rng_);
    std::vector<std::string> args = {"--head", head_dir_, "--max-sequences", "4", "--max-tokens-per-sequence", "400",
                                     "--log-level", "warning"};
    for (const std::string& a : ExtraArgs()) args.push_back(a);
    absl::Status st = server_.Start(SPC_RETRIEVER_BIN, args);
    ASSERT_TRUE(st.ok()) << st;
    stub_ = v1::Retriever::NewStub(grpc::CreateChannel(server_.address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (HasFailure()) {
      std::ifstream log(server_.log_path());
      std::stringstream text;
      text << log.rdbuf();
      std::cerr << "retriever log:\n" << text.str() << "\nhead kept in " << head_dir_ << "\n";
      return;
    }
    std::filesystem::remove_all(head_dir_);
  }

  void ExpectFreed() {
    double seqs = -1, bytes = -1, sessions = -1;
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    while (absl::Now() < give_up) {
      auto body = FetchMetrics(server_.metrics_port());
      ASSERT_TRUE(body.ok());
      seqs = MetricValue(*body, "spc_retriever_sequences").value_or(-1);
      bytes = MetricValue(*body, "spc_retriever_cache_bytes").value_or(-1);
      sessions = MetricValue(*body, "spc_retriever_sessions").value_or(-1);
      if (seqs == 0 && bytes == 0 && sessions == 0) return;
      absl::SleepFor(absl::Milliseconds(20));
    }
    FAIL() << "not freed: sequences=" << seqs << " cache_bytes=" << bytes << " sessions=" << sessions;
  }

  std::mt19937 rng_;
  std::string head_dir_;
  ServerProcess server_;
  std::unique_ptr<v1::Retriever::Stub> stub_;

  // Selections over the wire against RetrievalHead + SelectTopB: exact (min_overlap 1), or sharing at least
  // min_overlap of the positions over the run with the same layout (a Backend rounds differently).
  void ExpectSelectionsEqualDirectComputation(double min_overlap);
};

class RetrieverE2EBackend : public RetrieverE2E {
 protected:
  std::vector<std::string> ExtraArgs() const override { return {"--backend", "auto"}; }
};

TEST_F(RetrieverE2E, SelectionsEqualDirectComputation) { ExpectSelectionsEqualDirectComputation(1.0); }

TEST_F(RetrieverE2EBackend, SelectionsEqualDirectComputationUpToNearTies) {
  ExpectSelectionsEqualDirectComputation(0.98);
}

void RetrieverE2E::ExpectSelectionsEqualDirectComputation(double min_overlap) {
  int64_t kept = 0, shared = 0;
  auto head = RetrievalHead::Load(head_dir_, Stories260KConfig(), nullptr);
  ASSERT_TRUE(head.ok()) << head.status();
  grpc::ClientContext ctx;
  std::unique_ptr<Stream> stream = stub_->Session(&ctx);
  constexpr int kSeqs = 3;
  std::vector<RetrievalKvCache> caches;
  std::vector<Tensor> last_q(kSeqs);
  for (int s = 0; s < kSeqs; ++s) {
    caches.emplace_back(4, 8);
    ASSERT_TRUE(stream->Write(OpenReq(100 + s, 400)));
  }
  for (int step = 0; step < 4; ++step) {
    // A prompt chunk on the first step, then one token per sequence, as a decode loop sends them.
    for (int s = 0; s < kSeqs; ++s) {
      std::vector<int32_t> ids(step == 0 ? std::uniform_int_distribution<int>(2, 120)(rng_) : 1);
      for (int32_t& t : ids) t = static_cast<int32_t>(rng_() % 512);
      ASSERT_TRUE(stream->Write(ObserveReq(100 + s, ids)));
      Tensor q = Tensor::HostEmpty(DType::kF32, {static_cast<int64_t>(ids.size()), 8, 8});
      ASSERT_TRUE((*head)->Observe(ids, Tensor(), &caches[s], &q).ok());
      last_q[s] = *q.Rows(q.dim(0) - 1, q.dim(0)).Reshape({8, 8});
    }
    const int32_t budget = std::uniform_int_distribution<int>(1, 40)(rng_);
    v1::RetrieverRequest sel;
    for (int s = 0; s < kSeqs; ++s) sel.mutable_select()->add_sequence_ids(100 + s);
    sel.mutable_select()->set_budget(budget);
    sel.mutable_select()->set_step(step);
    ASSERT_TRUE(stream->Write(sel));
    v1::RetrieverResponse resp;
    if (!stream->Read(&resp)) {
      const grpc::Status st = stream->Finish();
      FAIL() << "stream ended: " << st.error_code() << " " << st.error_message();
    }
    ASSERT_FALSE(resp.has_error()) << resp.error().message();
    EXPECT_EQ(resp.selection().step(), static_cast<uint64_t>(step));

    std::vector<SelectionQuery> batch(kSeqs);
    for (int s = 0; s < kSeqs; ++s) {
      batch[s].q = last_q[s];
      batch[s].k_cache = caches[s].k();
      batch[s].len = caches[s].len() - 1;
    }
    SelectionOptions options;
    options.budget = budget;
    auto want = SelectTopB(batch, options);
    ASSERT_TRUE(want.ok()) << want.status();
    const v1::IndexSets& got = resp.selection().sets();
    EXPECT_EQ(got.n_seqs(), kSeqs);
    EXPECT_EQ(got.n_kv_heads(), 4);
    EXPECT_THAT(got.seq_len(), ::testing::ElementsAreArray(want->sets.seq_len));
    EXPECT_THAT(got.indptr(), ::testing::ElementsAreArray(want->sets.indptr));
    ASSERT_EQ(resp.selection().attention_mass_size(), static_cast<int>(want->captured_mass.size()));
    if (min_overlap >= 1.0) {
      EXPECT_THAT(got.indices(), ::testing::ElementsAreArray(want->sets.indices));
      for (size_t i = 0; i < want->captured_mass.size(); ++i) {
        EXPECT_NEAR(resp.selection().attention_mass(i), want->captured_mass[i], 1e-6);
      }
      continue;
    }
    // Per set, the positions both kept (a near-tie swap may move a query head's mass: only its range is checked).
    ASSERT_EQ(got.indices_size(), static_cast<int>(want->sets.indices.size()));
    for (int s = 0; s + 1 < got.indptr_size(); ++s) {
      std::vector<int32_t> a(want->sets.indices.begin() + want->sets.indptr[s],
                             want->sets.indices.begin() + want->sets.indptr[s + 1]);
      std::vector<int32_t> b(got.indices().begin() + got.indptr(s), got.indices().begin() + got.indptr(s + 1));
      std::vector<int32_t> common;
      std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
      kept += static_cast<int64_t>(a.size());
      shared += static_cast<int64_t>(common.size());
    }
    for (float m : resp.selection().attention_mass()) {
      EXPECT_GE(m, 0.0f);
      EXPECT_LE(m, 1.0f + 1e-3f);
    }
  }
  if (kept > 0) {
    EXPECT_GE(double(shared) / kept, min_overlap) << shared << " of " << kept << " positions shared";
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  ExpectFreed();
}

TEST_F(RetrieverE2E, GetInfoNamesTheHeadWithoutItsPath) {
  grpc::ClientContext ctx;
  v1::RetrieverInfo info;
  ASSERT_TRUE(stub_->GetInfo(&ctx, v1::RetrieverInfoRequest(), &info).ok());
  const std::string dir = head_dir_.back() == '/' ? head_dir_.substr(0, head_dir_.size() - 1) : head_dir_;
  EXPECT_EQ(info.head_name(), dir.substr(dir.rfind('/') + 1));
  EXPECT_EQ(info.head_name().find('/'), std::string::npos) << info.head_name();
  EXPECT_GT(info.n_kv_heads(), 0);
}

TEST_F(RetrieverE2E, ErrorsKeepTheStreamOpenAndLimitsHold) {
  grpc::ClientContext ctx;
  std::unique_ptr<Stream> stream = stub_->Session(&ctx);
  v1::RetrieverResponse resp;
  auto expect_error = [&](const v1::RetrieverRequest& req, absl::StatusCode code, const char* part) {
    ASSERT_TRUE(stream->Write(req));
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_TRUE(resp.has_error());
    EXPECT_EQ(resp.error().code(), static_cast<int>(code)) << resp.error().message();
    EXPECT_THAT(resp.error().message(), ::testing::HasSubstr(part));
  };
  expect_error(ObserveReq(7, {1, 2}), absl::StatusCode::kNotFound, "not open");
  for (int s = 0; s < 4; ++s) ASSERT_TRUE(stream->Write(OpenReq(s, 400)));
  expect_error(OpenReq(9, 400), absl::StatusCode::kResourceExhausted, "limit");
  expect_error(OpenReq(1, 400), absl::StatusCode::kAlreadyExists, "already open");
  expect_error(ObserveReq(1, {3, 512 + static_cast<int32_t>(rng_() % 100)}), absl::StatusCode::kInvalidArgument,
               "vocabulary");
  expect_error(ObserveReq(2, std::vector<int32_t>(401, 5)), absl::StatusCode::kResourceExhausted, "opened for");
  v1::RetrieverRequest sel;
  sel.mutable_select()->add_sequence_ids(3);
  sel.mutable_select()->set_budget(4);
  expect_error(sel, absl::StatusCode::kFailedPrecondition, "observed no token");
  sel.mutable_select()->set_budget(0);
  expect_error(sel, absl::StatusCode::kInvalidArgument, "budget");
  expect_error(v1::RetrieverRequest(), absl::StatusCode::kInvalidArgument, "exactly one");
  // An ObserveBatch with one bad entry is refused whole, naming that entry; an empty one is invalid.
  v1::RetrieverRequest batch;
  *batch.mutable_observe_batch()->add_observes() = ObserveReq(0, {1, 2}).observe();
  *batch.mutable_observe_batch()->add_observes() = ObserveReq(2, std::vector<int32_t>(401, 5)).observe();
  expect_error(batch, absl::StatusCode::kResourceExhausted, "opened for");
  EXPECT_EQ(resp.error().sequence_id(), 2u);
  v1::RetrieverRequest empty;
  empty.mutable_observe_batch();
  expect_error(empty, absl::StatusCode::kInvalidArgument, "no observes");
  v1::RetrieverRequest both = batch;
  *both.mutable_observe() = ObserveReq(0, {1}).observe();
  expect_error(both, absl::StatusCode::kInvalidArgument, "exactly one");
  // Sequence 0 observed nothing (the batch was refused), so selecting it still fails.
  v1::RetrieverRequest sel0;
  sel0.mutable_select()->add_sequence_ids(0);
  sel0.mutable_select()->set_budget(4);
  expect_error(sel0, absl::StatusCode::kFailedPrecondition, "observed no token");
  // Still serving: a valid observe + select on the same stream.
  ASSERT_TRUE(stream->Write(ObserveReq(3, {1, 5, 9, 11})));
  sel.mutable_select()->set_budget(2);
  ASSERT_TRUE(stream->Write(sel));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_FALSE(resp.has_error()) << resp.error().message();
  EXPECT_EQ(resp.selection().sets().indices_size(), 4 * 2);
  // Cancelling the stream frees its four sequences.
  ctx.TryCancel();
  stream->Finish();
  ExpectFreed();
}

// A hostile client's ways to exhaust the retriever, each refused before any work: an id named many
// times in one Select, a Select whose reply could pass the message limit, sessions past --max-sessions
// and caches past --max-cache-bytes (over all sessions).
TEST(RetrieverLimits, HostileSessionsAreRefusedBeforeAnyWork) {
  std::mt19937 rng(std::random_device{}());
  const std::string head_dir = WriteRandomHead(rng);
  RemoveOnExit head_guard{head_dir};
  ServerProcess server;
  absl::Status st = server.Start(SPC_RETRIEVER_BIN, {"--head", head_dir, "--max-sequences", "64",
                                                     "--max-tokens-per-sequence", "4096", "--max-sessions", "2",
                                                     "--max-cache-bytes", "200KiB", "--max-message-bytes", "4KiB",
                                                     "--log-level", "warning"});
  ASSERT_TRUE(st.ok()) << st;
  auto stub = v1::Retriever::NewStub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  std::unique_ptr<Stream> stream = stub->Session(&ctx);
  v1::RetrieverResponse resp;
  auto expect_error = [&](Stream* s, const v1::RetrieverRequest& req, absl::StatusCode code, const char* part) {
    ASSERT_TRUE(s->Write(req));
    ASSERT_TRUE(s->Read(&resp));
    ASSERT_TRUE(resp.has_error());
    EXPECT_EQ(resp.error().code(), static_cast<int>(code)) << resp.error().message();
    EXPECT_THAT(resp.error().message(), ::testing::HasSubstr(part));
  };
  std::vector<int32_t> tokens(300);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % 512);
  for (uint64_t id : {1, 2}) {
    ASSERT_TRUE(stream->Write(OpenReq(id, 4096)));
    ASSERT_TRUE(stream->Write(ObserveReq(id, tokens)));
  }
  // One id 1,000 times (2 KB, under this server's message limit; the reported attack sent it 20,000
  // times in 40 KB): refused without scoring it 1,000 times.
  v1::RetrieverRequest dup;
  for (int i = 0; i < 1000; ++i) dup.mutable_select()->add_sequence_ids(1);
  dup.mutable_select()->set_budget(8);
  expect_error(stream.get(), dup, absl::StatusCode::kInvalidArgument, "more than once");
  // 2 sequences x 4 KV heads x 200 indices x 4 bytes > 4 KiB: refused; one of them fits.
  v1::RetrieverRequest big;
  big.mutable_select()->add_sequence_ids(1);
  big.mutable_select()->add_sequence_ids(2);
  big.mutable_select()->set_budget(200);
  expect_error(stream.get(), big, absl::StatusCode::kResourceExhausted, "--max-message-bytes");
  big.mutable_select()->mutable_sequence_ids()->RemoveLast();
  ASSERT_TRUE(stream->Write(big));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_FALSE(resp.has_error()) << resp.error().message();
  EXPECT_EQ(resp.selection().sets().indices_size(), 4 * 200);
  // Caches: each sequence holds 512 rows x 4 KV heads x 8 dims x 4 bytes = 64 KiB now; new ones take
  // 32 KiB, so the 200 KiB process bound refuses the third or fourth open.
  uint64_t next = 3;
  for (; next < 64; ++next) {
    ASSERT_TRUE(stream->Write(OpenReq(next, 4096)));
    v1::RetrieverRequest probe;  // an error reply tells whether the open was refused
    probe.mutable_close()->set_sequence_id(1000);
    ASSERT_TRUE(stream->Write(probe));
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_TRUE(resp.has_error());
    if (resp.error().sequence_id() == next) break;
    ASSERT_EQ(resp.error().sequence_id(), 1000u) << resp.error().message();
  }
  ASSERT_LT(next, 6u) << "the cache bound never refused an open";
  EXPECT_EQ(resp.error().code(), static_cast<int>(absl::StatusCode::kResourceExhausted)) << resp.error().message();
  EXPECT_THAT(resp.error().message(), ::testing::HasSubstr("--max-cache-bytes"));
  ASSERT_TRUE(stream->Read(&resp));  // the probe's NotFound
  // Growing a cache past the bound is refused too, before the head runs.
  expect_error(stream.get(), ObserveReq(1, tokens), absl::StatusCode::kResourceExhausted, "--max-cache-bytes");
  auto body = FetchMetrics(server.metrics_port());
  ASSERT_TRUE(body.ok());
  EXPECT_LE(MetricValue(*body, "spc_retriever_cache_bytes").value_or(-1), 200 * 1024);
  // Sessions: a second one is served, a third refused with RESOURCE_EXHAUSTED.
  grpc::ClientContext ctx2, ctx3;
  std::unique_ptr<Stream> second = stub->Session(&ctx2);
  v1::RetrieverRequest close_unknown;
  close_unknown.mutable_close()->set_sequence_id(5);
  expect_error(second.get(), close_unknown, absl::StatusCode::kNotFound, "not open");
  std::unique_ptr<Stream> third = stub->Session(&ctx3);
  third->Write(close_unknown);
  EXPECT_FALSE(third->Read(&resp));
  const grpc::Status refused = third->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), ::testing::HasSubstr("--max-sessions"));
  // A session that ends gives its slot back.
  second->WritesDone();
  EXPECT_TRUE(second->Finish().ok());
  grpc::ClientContext ctx4;
  std::unique_ptr<Stream> fourth = stub->Session(&ctx4);
  expect_error(fourth.get(), close_unknown, absl::StatusCode::kNotFound, "not open");
  fourth->WritesDone();
  EXPECT_TRUE(fourth->Finish().ok());
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// --backend: an unknown name, or cuda on a build or machine without one, fails startup with exit 1.
TEST(RetrieverBackendFlag, RefusedBackendsFailStartup) {
  std::mt19937 rng(std::random_device{}());
  const std::string dir = WriteRandomHead(rng);
  RemoveOnExit dir_guard{dir};
  auto start = [&](const std::string& backend) {
    int code = -1;
    RunCommand({SPC_RETRIEVER_BIN, "--head", dir, "--backend", backend, "--listen", "127.0.0.1:0", "--metrics-port",
                "0", "--log-level", "error"},
               &code);
    return code;
  };
  EXPECT_EQ(start("gpu"), 1);
  if (MakeBackend("cuda", 0).ok()) GTEST_SKIP() << "this machine has a GPU: --backend cuda serves";
  EXPECT_EQ(start("cuda"), 1);
}

TEST(RetrieverSessionInProcess, ClosingAndDestroyingFreeEverything) {
  std::mt19937 rng(std::random_device{}());
  const std::string dir = WriteRandomHead(rng);
  RemoveOnExit dir_guard{dir};
  auto head = RetrievalHead::Load(dir, Stories260KConfig(), nullptr);
  ASSERT_TRUE(head.ok()) << head.status();
  retriever::RetrieverTotals totals;
  {
    retriever::RetrieverSession session(head->get(), {}, &totals);
    for (uint64_t id = 0; id < 5; ++id) {
      ASSERT_TRUE(session.Open(id, 300).ok());
      std::vector<int32_t> ids(1 + rng() % 280);
      for (int32_t& t : ids) t = static_cast<int32_t>(rng() % 512);
      ASSERT_TRUE(session.Observe(id, ids, {}).ok());
    }
    EXPECT_EQ(totals.sequences.load(), 5);
    EXPECT_GT(totals.cache_bytes.load(), 0);
    ASSERT_TRUE(session.Close(2).ok());
    EXPECT_EQ(totals.sequences.load(), 4);
    EXPECT_EQ(session.Close(2).code(), absl::StatusCode::kNotFound);
    auto sel = session.Select({0, 1, 3, 4}, 16);
    ASSERT_TRUE(sel.ok()) << sel.status();
    EXPECT_TRUE(ValidateIndexSets(sel->sets).ok());
  }
  EXPECT_EQ(totals.sessions.load(), 0);
  EXPECT_EQ(totals.sequences.load(), 0);
  EXPECT_EQ(totals.cache_bytes.load(), 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace specontext::testing

namespace specontext::testing {
namespace {

// `--retriever inproc` loads the head into the generator at startup: a fitting head serves (with no
// --budget, requests that name no budget run dense, so output equals the engine CLI's dense output); a
// head made for another model is refused with a message naming the mismatch.
TEST(GeneratorInprocRetriever, LoadsAFittingHeadAndRefusesAMismatchedOne) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  std::mt19937 rng(std::random_device{}());
  const std::string head_dir = WriteRandomHead(rng);
  RemoveOnExit head_guard{head_dir};
  const std::vector<std::string> model_args = {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin",
                                               "--backend", "cpu", "--threads", "1", "--log-level", "warning"};
  {
    ServerProcess server;
    std::vector<std::string> args = model_args;
    for (const char* a : {"--retriever", "inproc", "--retrieval-head"}) args.push_back(a);
    args.push_back(head_dir);
    absl::Status st = server.Start(SPC_GENERATOR_BIN, args);
    ASSERT_TRUE(st.ok()) << st;
    v1::GenerateRequest req;
    req.set_prompt("The little dog");
    req.set_max_new_tokens(24);
    StreamResult r = CallGenerate(GeneratorStub(server.address()).get(), req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    int code = -1;
    const std::string cli = RunCommand({SPC_ENGINE_CLI_BIN, "generate", "--model", dir + "/stories260K.bin",
                                        "--tokenizer", dir + "/tok512.bin", "--backend", "cpu", "--prompt",
                                        "The little dog", "--max-new-tokens", "24", "--temperature", "0"},
                                       &code);
    ASSERT_EQ(code, 0);
    EXPECT_EQ(r.text + "\n", cli);
  }
  // Rewrite the head's config for a model with 2 KV heads: startup must fail, naming the field.
  {
    std::ifstream in(head_dir + "/config.json");
    std::stringstream ss;
    ss << in.rdbuf();
    auto config = ParseRetrievalHeadConfig(ss.str());
    ASSERT_TRUE(config.ok()) << config.status();
    config->target.num_key_value_heads = 2;
    std::ofstream(head_dir + "/config.json") << RetrievalHeadConfigToJson(*config);
    std::vector<std::string> argv = {SPC_GENERATOR_BIN};
    argv.insert(argv.end(), model_args.begin(), model_args.end());
    for (const char* a : {"--retriever", "inproc", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                          "--retrieval-head"}) {
      argv.push_back(a);
    }
    argv.push_back(head_dir);
    int code = -1;
    RunCommand(argv, &code);
    EXPECT_EQ(code, 1);
  }
  std::filesystem::remove_all(head_dir);
}

}  // namespace
}  // namespace specontext::testing
