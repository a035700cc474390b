// RemoteSparseDecoder's connection to the retriever: the background connect/reconnect loop with
// backoff, failure detection, and the re-opening of live sequences on a new session.
#include <algorithm>
#include <limits>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "core/log.h"
#include "generator/remote_sparse_decoder.h"
#include "generator/remote_sparse_stream.h"

namespace specontext::generator {

grpc::ChannelArguments RetrieverChannelArguments(const RemoteSparseOptions& options) {
  grpc::ChannelArguments args;
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  // Selection replies grow with sequences x budget x KV heads: accept what the flag allows, not gRPC's 4 MiB.
  args.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(options.max_message_bytes, std::numeric_limits<int>::max())));
  return args;
}

void RemoteSparseDecoder::ConnectLoop() {
  absl::Duration backoff = options_.backoff_min;
  bool first = true;
  while (true) {
    std::shared_ptr<Stream> old;
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this] { return stop_ || want_connect_; };
      mu_.Await(absl::Condition(&wake));
      if (stop_) return;
      old = std::move(stream_);
    }
    if (old != nullptr) {
      old->context.TryCancel();
      if (old->reader.joinable()) old->reader.join();
    }
    auto s = std::make_shared<Stream>();
    grpc::ChannelArguments channel_args = RetrieverChannelArguments(options_);
    auto channel = grpc::CreateCustomChannel(
        options_.address,
        options_.credentials != nullptr ? options_.credentials : grpc::InsecureChannelCredentials(), channel_args);
    s->stub = v1::Retriever::NewStub(channel);
    // Wait for the server to answer before opening the session, so a down retriever costs no step time.
    bool up = channel->WaitForConnected(std::chrono::system_clock::now() +
                                        std::chrono::milliseconds(absl::ToInt64Milliseconds(backoff)));
    if (up) {
      grpc::ClientContext info_ctx;
      info_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      up = s->stub->GetInfo(&info_ctx, v1::RetrieverInfoRequest(), &s->info).ok();
    }
    if (!up) {
      {
        absl::MutexLock lock(&mu_);
        if (stop_) return;
      }
      backoff = std::min(backoff * 2, options_.backoff_max);
      continue;
    }
    s->rw = s->stub->Session(&s->context);
    Stream* raw = s.get();
    s->reader = std::thread([this, raw, weak = std::weak_ptr<Stream>(s)] {
      v1::RetrieverResponse resp;
      while (raw->rw->Read(&resp)) {
        absl::MutexLock lock(&raw->mu);
        raw->inbox.push_back(std::move(resp));
        resp.Clear();
      }
      raw->rw->Finish().IgnoreError();
      {
        absl::MutexLock lock(&raw->mu);
        raw->broken = true;
      }
      if (auto self = weak.lock()) MarkBroken(self);
    });
    bool stopping = false;
    {
      absl::MutexLock lock(&mu_);
      stopping = stop_;
      if (!stopping) {
        s->generation = ++generation_;
        stream_ = s;
        want_connect_ = false;
      }
    }
    if (stopping) {  // the destructor runs: this stream was never published, so end it here
      s->context.TryCancel();
      s->reader.join();
      return;
    }
    connected_ = true;
    if (!first) ++reconnects_;
    first = false;
    backoff = options_.backoff_min;
    SPC_LOG(INFO) << "retriever session open" << Kv("address", options_.address) << Kv("generation", s->generation);
  }
}

void RemoteSparseDecoder::MarkBroken(const std::shared_ptr<Stream>& s) {
  absl::MutexLock lock(&mu_);
  if (stream_ != s || want_connect_) return;
  want_connect_ = true;
  connected_ = false;
  SPC_LOG(WARNING) << "retriever session lost; reconnecting in the background" << Kv("address", options_.address);
}

bool RemoteSparseDecoder::Send(Stream& s, const v1::RetrieverRequest& req) {
  {
    absl::MutexLock lock(&s.mu);
    if (s.broken) return false;
  }
  return s.rw->Write(req);
}

std::shared_ptr<RemoteSparseDecoder::Stream> RemoteSparseDecoder::Usable() {
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock lock(&mu_);
    if (want_connect_) return nullptr;
    s = stream_;
  }
  if (s == nullptr) return nullptr;
  if (!s->resynced) {
    LearnHead(*s);
    // A new session knows none of the live sequences: open them and replay their tokens (and features),
    // batched as a step's observes are (each sequence's Open goes before the batch naming it).
    PendingObserves replay;
    for (auto& [id, seq] : seqs_) {
      if (seq.session == s->generation) continue;  // already open on it
      if (fused_width_ > 0 && !seq.features_complete) continue;  // cannot be replayed: stays on the fallback
      v1::RetrieverRequest open;
      open.mutable_open()->set_sequence_id(id);
      open.mutable_open()->set_max_tokens(seq.capacity);
      const bool ok = Send(*s, open) && QueueObserves(*s, replay, id, seq, 0, seq.tokens.size());
      if (!ok) {
        MarkBroken(s);
        return nullptr;
      }
      seq.session = s->generation;
    }
    if (!FlushObserves(*s, replay)) {
      MarkBroken(s);
      return nullptr;
    }
    s->resynced = true;
  }
  return s;
}

}  // namespace specontext::generator
