#include "generator/tensor_parallel_ranks.h"

#include "absl/strings/str_cat.h"
#include "core/log.h"

namespace specontext::generator {

void RecordEvent(RankStepRecord* record, uint64_t id, const StreamEvent& ev) {
  record->events.push_back({id, ev.token, ev.done, ev.reason,
                            ev.reason == FinishReason::kError ? ev.status.code() : absl::StatusCode::kOk});
}

std::string RankStepRecord::Diff(const RankStepRecord& o) const {
  if (step_code != o.step_code) {
    return absl::StrCat("step status ", absl::StatusCodeToString(step_code), " vs ",
                        absl::StatusCodeToString(o.step_code));
  }
  if (fence_ok != o.fence_ok || !fence_ok) return "the step fence failed";
  if (events.size() != o.events.size()) return absl::StrCat(events.size(), " events vs ", o.events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    if (!(events[i] == o.events[i])) {
      return absl::StrCat("event ", i, ": request ", events[i].id, " token ", events[i].token, " vs request ",
                          o.events[i].id, " token ", o.events[i].token);
    }
  }
  if (running != o.running || queued != o.queued) {
    return absl::StrCat("running/queued ", running, "/", queued, " vs ", o.running, "/", o.queued);
  }
  return "";
}

struct TensorParallelRanks::Rank {
  Engine* engine = nullptr;
  Communicator* comm = nullptr;
  absl::Mutex mu;
  uint64_t started ABSL_GUARDED_BY(mu) = 0;   // steps asked for
  uint64_t finished ABSL_GUARDED_BY(mu) = 0;  // steps done
  bool stop ABSL_GUARDED_BY(mu) = false;
  // Written by the rank's thread while a step runs, read by the loop thread after FinishStep (ordered by mu).
  RankStepRecord record;
  std::thread thread;
};

TensorParallelRanks::TensorParallelRanks(std::vector<Engine*> engines, std::vector<Communicator*> comms)
    : comms_(std::move(comms)) {
  for (size_t i = 0; i < engines.size(); ++i) {
    auto r = std::make_unique<Rank>();
    r->engine = engines[i];
    r->comm = comms_[i + 1];
    ranks_.push_back(std::move(r));
  }
  for (auto& r : ranks_) r->thread = std::thread([this, p = r.get()] { RunRank(p); });
}

TensorParallelRanks::~TensorParallelRanks() {
  for (auto& r : ranks_) {
    absl::MutexLock lock(&r->mu);
    r->stop = true;
  }
  for (auto& r : ranks_) r->thread.join();
}

std::vector<absl::StatusOr<uint64_t>> TensorParallelRanks::Submit(const GenerationRequest& request) {
  std::vector<absl::StatusOr<uint64_t>> ids;
  for (auto& r : ranks_) {
    // The id is known only once Submit returns; events come from Step() only, after it is set.
    auto id = std::make_shared<uint64_t>(0);
    Rank* rank = r.get();
    ids.push_back(r->engine->Submit(request, [rank, id](const StreamEvent& ev) { RecordEvent(&rank->record, *id, ev); }));
    if (ids.back().ok()) *id = *ids.back();
  }
  return ids;
}

void TensorParallelRanks::Cancel(uint64_t id) {
  for (auto& r : ranks_) r->engine->Cancel(id);
}

void TensorParallelRanks::StartStep() {
  for (auto& r : ranks_) {
    absl::MutexLock lock(&r->mu);
    ++r->started;
  }
}

std::vector<RankStepRecord> TensorParallelRanks::FinishStep() {
  std::vector<RankStepRecord> out;
  for (auto& r : ranks_) {
    absl::MutexLock lock(&r->mu);
    Rank* p = r.get();
    auto done = [p]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return p->finished == p->started; };
    r->mu.Await(absl::Condition(&done));
    out.push_back(std::move(r->record));
    r->record = RankStepRecord{};
  }
  return out;
}

bool TensorParallelRanks::Fence0() {
  const absl::Status st = comms_[0]->Barrier();
  if (st.ok()) return true;
  SPC_LOG(ERROR) << "tensor-parallel step fence failed" << Kv("rank", 0) << Kv("status", st.ToString());
  comms_[0]->Abort();
  return false;
}

void TensorParallelRanks::Abort() { comms_[0]->Abort(); }

void TensorParallelRanks::RunRank(Rank* r) {
  uint64_t done = 0;
  // The rank's backend may sit on another GPU than this thread's current one (CUDA ranks on separate GPUs).
  // A failure here fails the rank's first step instead (its ops would run on the wrong device).
  const absl::Status bound = r->engine->model()->backend()->MakeCurrent();
  while (true) {
    {
      absl::MutexLock lock(&r->mu);
      auto ready = [r, &done]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return r->stop || r->started > done; };
      r->mu.Await(absl::Condition(&ready));
      if (r->stop && r->started == done) return;
    }
    const absl::Status st = bound.ok() ? r->engine->Step() : bound;
    if (!st.ok()) {
      SPC_LOG(ERROR) << "tensor-parallel rank step failed" << Kv("rank", r->comm->rank()) << Kv("status", st.ToString());
    }
    r->record.step_code = st.code();
    const absl::Status fence = r->comm->Barrier();
    r->record.fence_ok = fence.ok();
    if (!fence.ok()) {
      SPC_LOG(ERROR) << "tensor-parallel step fence failed" << Kv("rank", r->comm->rank())
                     << Kv("status", fence.ToString());
      r->comm->Abort();
    }
    r->record.running = r->engine->running();
    r->record.queued = r->engine->queued();
    ++done;
    absl::MutexLock lock(&r->mu);
    r->finished = done;
  }
}

}  // namespace specontext::generator
