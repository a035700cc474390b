// Split mode's fallback when the retriever is down or late (DESIGN.md §2, issue 5): resident layers attend
// densely over their full KV (exact), offloaded layers to the sink + recent window their slot buffers hold.
//   1. The mechanism (SparseForward::dense_resident_layers): with layers 0..1 resident and layer 2 offloaded,
//      the hidden states entering layers 1 and 2 equal a dense forward's exactly; attending to the window on
//      every layer (the old fallback) changes them.
//   2. RemoteSparseDecoder with no retriever: every decode step past the budget falls back and its logits equal
//      that mechanism's on an identically tiered copy of the sequence (and differ from the window on every
//      layer).
//   3. A retriever whose answers pass ValidateIndexSets but not the forward's needs (seq_len not the
//      real past, sets over the budget with offloaded layers, a wrong number of sets, another step's
//      answer): every such step falls back as (2) does and the forward never fails (it used to fail
//      the whole batch).
// In process, on the tiny random checkpoint of tests/sparse_engine (3 layers, GQA 8/2, head_dim 8), CPU.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/model/kv_tiers.h"
#include "core/sparse/elastic.h"
#include "generator/remote_sparse_decoder.h"
#include "tests/sparse_engine/tiny_setup.h"

namespace specontext::testing {
namespace {

constexpr int32_t kBudget = 6, kSink = 1, kGpuLayers = 2;

// Sink + most recent positions, one set per KV head (written here independently of the decoder's).
IndexSets Window(int32_t past, int32_t n_kv, int32_t budget = kBudget) {
  IndexSets s;
  s.Reset(1, n_kv, n_kv, budget);
  s.seq_len[0] = past;
  s.indptr.clear();
  s.indptr.push_back(0);
  for (int32_t h = 0; h < n_kv; ++h) {
    for (int32_t t = 0; t < kSink; ++t) s.indices.push_back(t);
    for (int32_t t = past - (budget - kSink); t < past; ++t) s.indices.push_back(t);
    s.indptr.push_back(static_cast<int32_t>(s.indices.size()));
  }
  return s;
}

// One decode forward of `token` on the tiered `kv`: window sets, every offloaded layer fully reloaded (so the
// slot buffers do not depend on earlier steps), resident layers dense or on the window. Returns the logits
// and, in *capture, the residual entering layers 1 and 2.
absl::StatusOr<Tensor> WindowStep(Transformer& model, SequenceKv* kv, int32_t token, int32_t past, bool dense_resident,
                                  HiddenCapture* capture) {
  const int32_t n_kv = static_cast<int32_t>(model.config().num_key_value_heads);
  const IndexSets sets = Window(past, n_kv);
  SlotMap map(n_kv, kBudget);
  const SlotMap* maps[] = {&map};
  ASSIGN_OR_RETURN(ElasticPlan plan, PlanElasticLoads(maps, sets));
  const CopyList full = FullReloadCopies(sets, plan.slots);
  SparseForward sf;
  sf.desc.sets = &sets;
  sf.desc.slots = plan.slots;
  sf.layer_copies.assign(model.config().num_hidden_layers, nullptr);
  for (int l = kGpuLayers; l < model.config().num_hidden_layers; ++l) sf.layer_copies[l] = &full;
  sf.dense_resident_layers = dense_resident;
  const int32_t tokens[] = {token};
  ForwardSeq f{tokens, past, kv};
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, model.config().vocab_size});
  RETURN_IF_ERROR(model.Forward({&f, 1}, false, &logits, &sf, capture));
  return logits;
}

bool Equal(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// The decoder's KV of sequence 1 and an identically tiered reference KV, both prefilled with
// `prompt` (the decoder's logits of it in *logits), for decode steps compared one to one.
struct TieredPair {
  std::unique_ptr<SequenceKv> kv, ref;
};
absl::StatusOr<TieredPair> PrefillBoth(generator::RemoteSparseDecoder& dec, Transformer& model,
                                       Backend& b, const std::vector<int32_t>& prompt,
                                       Tensor* logits) {
  constexpr int32_t kCapacity = 64;
  TieredPair p;
  ASSIGN_OR_RETURN(p.kv, dec.AllocateKv(1, kCapacity, kBudget));
  ASSIGN_OR_RETURN(p.ref, AllocateTieredKv(b, model.config(), kCapacity, kGpuLayers, kBudget));
  const SparseStepSeq step{1, kBudget};
  ForwardSeq f{prompt, 0, p.kv.get()};
  RETURN_IF_ERROR(dec.Forward({&f, 1}, {&step, 1}, logits));
  ForwardSeq r{prompt, 0, p.ref.get()};
  Tensor unused = Tensor::HostEmpty(DType::kF32, {1, model.config().vocab_size});
  RETURN_IF_ERROR(model.Forward({&r, 1}, false, &unused));
  return p;
}

TEST(SplitFallback, ResidentLayersAttendDensely) {
  auto tiny = LoadTiny(7);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Transformer& model = *(*tiny)->model;
  Backend& b = *(*tiny)->backend;
  const ModelConfig& c = model.config();
  ASSERT_EQ(c.num_hidden_layers, 3);
  const int32_t cap = 64;
  const std::vector<int32_t> prompt = RandomPrompt(23, c.vocab_size, std::random_device{}());
  auto tiered = AllocateTieredKv(b, c, cap, kGpuLayers, kBudget);
  auto dense = model.AllocateKv(cap);
  ASSERT_TRUE(tiered.ok() && dense.ok());
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  for (SequenceKv* kv : {tiered->get(), dense->get()}) {
    ForwardSeq f{prompt, 0, kv};
    ASSERT_TRUE(model.Forward({&f, 1}, false, &logits).ok());
  }
  const int32_t past = static_cast<int32_t>(prompt.size()), token = prompt[5];
  HiddenCapture want;
  want.layers = {1, 2};
  {
    const int32_t tokens[] = {token};
    ForwardSeq f{tokens, past, dense->get()};
    ASSERT_TRUE(model.Forward({&f, 1}, false, &logits, nullptr, &want).ok());
  }
  // The old fallback first (its appended row is then overwritten by the new one at the same position).
  HiddenCapture all_window, fallback;
  all_window.layers = fallback.layers = {1, 2};
  ASSERT_TRUE(WindowStep(model, tiered->get(), token, past, /*dense_resident=*/false, &all_window).ok());
  ASSERT_TRUE(WindowStep(model, tiered->get(), token, past, /*dense_resident=*/true, &fallback).ok());
  EXPECT_TRUE(Equal(fallback.out, want.out)) << "resident layers did not attend densely";
  EXPECT_FALSE(Equal(all_window.out, want.out)) << "the window did not change the resident layers: test is blind";
}

TEST(SplitFallback, DecoderWithoutRetrieverFallsBackPerLayer) {
  auto tiny = LoadTiny(11);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Transformer& model = *(*tiny)->model;
  Backend& b = *(*tiny)->backend;
  const ModelConfig& c = model.config();
  generator::RemoteSparseOptions o;
  o.address = "127.0.0.1:1";  // nothing listens: every selection is missing
  o.budget = kBudget;
  o.sink = kSink;
  o.step_deadline = absl::Milliseconds(20);
  o.backoff_max = absl::Milliseconds(100);
  auto dec = generator::RemoteSparseDecoder::Create(&model, o);
  ASSERT_TRUE(dec.ok()) << dec.status();
  ASSERT_TRUE((*dec)->OffloadLayers(kGpuLayers).ok());
  const std::vector<int32_t> prompt = RandomPrompt(17, c.vocab_size, std::random_device{}());
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  auto pair = PrefillBoth(**dec, model, b, prompt, &logits);
  ASSERT_TRUE(pair.ok()) << pair.status();
  SequenceKv* const kv = pair->kv.get();
  SequenceKv* const ref = pair->ref.get();
  const SparseStepSeq step{1, kBudget};
  int32_t past = static_cast<int32_t>(prompt.size());
  int differs_from_all_window = 0;
  const int kSteps = 6;
  for (int s = 0; s < kSteps; ++s, ++past) {
    const int32_t token = static_cast<int32_t>(
        std::max_element(logits.as<float>(), logits.as<float>() + c.vocab_size) - logits.as<float>());
    const int32_t tokens[] = {token};
    ForwardSeq f{tokens, past, kv};
    ASSERT_TRUE((*dec)->Forward({&f, 1}, {&step, 1}, &logits).ok());
    auto old = WindowStep(model, ref, token, past, false, nullptr);
    auto want = WindowStep(model, ref, token, past, true, nullptr);
    ASSERT_TRUE(old.ok() && want.ok());
    EXPECT_TRUE(Equal(logits, *want)) << "step " << s;
    differs_from_all_window += Equal(logits, *old) ? 0 : 1;
  }
  EXPECT_GT(differs_from_all_window, 0);
  EXPECT_EQ((*dec)->path_stats().fallback_steps, kSteps);
  EXPECT_EQ((*dec)->path_stats().remote_steps, 0);
  (*dec)->Release(1);
}

// What a fake retriever answers each Select with.
enum class Answer { kValid, kWrongSeqLen, kOverBudget, kWrongSetCount, kFutureStep };

// A Retriever that answers every Select with window sets over `past` (set by the test before each
// step), spoiled as `answer` says; every such answer but kFutureStep's passes ValidateIndexSets.
class FakeRetriever final : public v1::Retriever::Service {
 public:
  FakeRetriever(int32_t n_kv, Answer answer) : n_kv_(n_kv), answer_(answer) {}
  std::atomic<int32_t> past{0};

  grpc::Status GetInfo(grpc::ServerContext*, const v1::RetrieverInfoRequest*,
                       v1::RetrieverInfo* info) override {
    info->set_n_kv_heads(n_kv_);
    return grpc::Status::OK;
  }
  grpc::Status Session(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::RetrieverResponse, v1::RetrieverRequest>* rw) override {
    v1::RetrieverRequest req;
    while (rw->Read(&req)) {
      if (!req.has_select()) continue;
      const int32_t p = past;
      IndexSets sets = Window(answer_ == Answer::kWrongSeqLen ? p - 1 : p, n_kv_,
                              answer_ == Answer::kOverBudget ? kBudget + 2 : kBudget);
      if (answer_ == Answer::kWrongSetCount) {  // a second sequence the Select did not name
        sets.n_seqs = 2;
        sets.seq_len.push_back(p);
        for (int32_t h = 0; h < n_kv_; ++h) sets.indptr.push_back(sets.indptr.back());
      }
      EXPECT_TRUE(ValidateIndexSets(sets).ok());
      v1::RetrieverResponse r;
      v1::Selection* sel = r.mutable_selection();
      sel->set_step(req.select().step() + (answer_ == Answer::kFutureStep ? 1 : 0));
      v1::IndexSets* ps = sel->mutable_sets();
      ps->set_n_seqs(sets.n_seqs);
      ps->set_n_kv_heads(sets.n_kv_heads);
      ps->set_sets_per_seq(sets.sets_per_seq);
      ps->set_budget(sets.budget);
      ps->mutable_seq_len()->Add(sets.seq_len.begin(), sets.seq_len.end());
      ps->mutable_indptr()->Add(sets.indptr.begin(), sets.indptr.end());
      ps->mutable_indices()->Add(sets.indices.begin(), sets.indices.end());
      if (!rw->Write(r)) break;
    }
    return grpc::Status::OK;
  }

 private:
  const int32_t n_kv_;
  const Answer answer_;
};

class SplitBadAnswer : public ::testing::TestWithParam<Answer> {};

TEST_P(SplitBadAnswer, FallsBackWithoutFailingTheForward) {
  auto tiny = LoadTiny(13);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  Transformer& model = *(*tiny)->model;
  Backend& b = *(*tiny)->backend;
  const ModelConfig& c = model.config();
  FakeRetriever fake(static_cast<int32_t>(c.num_key_value_heads), GetParam());
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&fake);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_TRUE(server != nullptr && port > 0);

  generator::RemoteSparseOptions o;
  o.address = "127.0.0.1:" + std::to_string(port);
  o.budget = kBudget;
  o.sink = kSink;
  o.step_deadline =
      absl::Seconds(2);  // only kFutureStep waits it out: every other answer comes at once
  if (GetParam() == Answer::kFutureStep) o.step_deadline = absl::Milliseconds(200);
  auto dec = generator::RemoteSparseDecoder::Create(&model, o);
  ASSERT_TRUE(dec.ok()) << dec.status();
  for (int i = 0; i < 500 && !(*dec)->path_stats().connected; ++i)
    absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE((*dec)->path_stats().connected);
  ASSERT_TRUE((*dec)->OffloadLayers(kGpuLayers).ok());
  const std::vector<int32_t> prompt = RandomPrompt(17, c.vocab_size, std::random_device{}());
  Tensor logits = Tensor::HostEmpty(DType::kF32, {1, c.vocab_size});
  auto pair = PrefillBoth(**dec, model, b, prompt, &logits);
  ASSERT_TRUE(pair.ok()) << pair.status();
  SequenceKv* const kv = pair->kv.get();
  SequenceKv* const ref = pair->ref.get();
  const SparseStepSeq step{1, kBudget};
  int32_t past = static_cast<int32_t>(prompt.size());
  const int kSteps = 4;
  for (int s = 0; s < kSteps; ++s, ++past) {
    const int32_t token = static_cast<int32_t>(
        std::max_element(logits.as<float>(), logits.as<float>() + c.vocab_size) -
        logits.as<float>());
    const int32_t tokens[] = {token};
    fake.past = past;
    ForwardSeq f{tokens, past, kv};
    const absl::Status st = (*dec)->Forward({&f, 1}, {&step, 1}, &logits);
    ASSERT_TRUE(st.ok()) << "step " << s << ": " << st;
    auto want = WindowStep(model, ref, token, past, GetParam() != Answer::kValid, nullptr);
    ASSERT_TRUE(want.ok());
    if (GetParam() != Answer::kValid) {
      EXPECT_TRUE(Equal(logits, *want)) << "step " << s;
    }
  }
  // The valid answer shows the fake is reached and used: the other answers are refused, not missed.
  const bool valid = GetParam() == Answer::kValid;
  EXPECT_EQ((*dec)->path_stats().fallback_steps, valid ? 0 : kSteps);
  EXPECT_EQ((*dec)->path_stats().remote_steps, valid ? kSteps : 0);
  (*dec)->Release(1);
  dec->reset();
  server->Shutdown();
}

std::string AnswerName(const ::testing::TestParamInfo<Answer>& info) {
  constexpr const char* kNames[] = {"Valid", "WrongSeqLen", "OverBudget", "WrongSetCount",
                                    "FutureStep"};
  return kNames[static_cast<int>(info.param)];
}

INSTANTIATE_TEST_SUITE_P(Answers, SplitBadAnswer,
                         ::testing::Values(Answer::kValid, Answer::kWrongSeqLen,
                                           Answer::kOverBudget, Answer::kWrongSetCount,
                                           Answer::kFutureStep),
                         AnswerName);

TEST(ValidateSelection, RefusesWhatTheForwardWouldRefuse) {
  const int32_t past[] = {20};
  const IndexSets good = Window(20, 2);
  EXPECT_TRUE(generator::ValidateSelection(good, past, 2, 2, kBudget).ok());
  EXPECT_FALSE(generator::ValidateSelection(Window(19, 2), past, 2, 2, kBudget).ok());
  EXPECT_FALSE(generator::ValidateSelection(Window(20, 2, kBudget + 1), past, 2, 2, kBudget).ok());
  EXPECT_FALSE(generator::ValidateSelection(good, past, 3, 2, kBudget).ok());
  EXPECT_FALSE(generator::ValidateSelection(good, past, 2, 1, kBudget).ok());
  const int32_t two[] = {20, 20};
  EXPECT_FALSE(generator::ValidateSelection(good, two, 2, 2, kBudget).ok());
  IndexSets bad = good;
  bad.indptr.back() += 1;  // not ValidateIndexSets-valid
  EXPECT_FALSE(generator::ValidateSelection(bad, past, 2, 2, kBudget).ok());
}

// The channel to the retriever receives what the generator's --retriever-max-message-bytes allows (by
// default the retriever's own send limit): a Selection of 64 sequences x B 4096 x 8 KV heads x 4 bytes
// (8 MiB) passes gRPC's 4 MiB default.
TEST(RetrieverChannelTest, ReceiveLimitFollowsRetrieverMaxMessageBytes) {
  auto receive_limit = [](const generator::RemoteSparseOptions& o) -> int64_t {
    const grpc::ChannelArguments args = generator::RetrieverChannelArguments(o);
    grpc_channel_args c;
    args.SetChannelArgs(&c);
    for (size_t i = 0; i < c.num_args; ++i) {
      if (std::string(c.args[i].key) == GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH && c.args[i].type == GRPC_ARG_INTEGER) {
        return c.args[i].value.integer;
      }
    }
    return -1;  // not set: gRPC's 4 MiB default
  };
  generator::RemoteSparseOptions o;
  EXPECT_EQ(receive_limit(o), int64_t{64} << 20);  // the retriever's default send limit
  o.max_message_bytes = int64_t{4} << 20;
  EXPECT_EQ(receive_limit(o), int64_t{4} << 20);
  o.max_message_bytes = int64_t{1} << 40;  // clamped to what gRPC takes
  EXPECT_EQ(receive_limit(o), std::numeric_limits<int>::max());
}

}  // namespace
}  // namespace specontext::testing
