// Private to RemoteSparseDecoder (remote_sparse_decoder.cc, remote_sparse_connection.cc): one
// Retriever.Session call and its reader thread.
#pragma once

#include <atomic>
#include <deque>
#include <memory>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "generator/remote_sparse_decoder.h"
#include "proto/specontext.grpc.pb.h"

namespace specontext::generator {

// One Retriever.Session call. The engine thread writes; the reader thread reads until the stream
// breaks and parks Selections (and errors) in `inbox` for the engine thread to pick up by step.
struct RemoteSparseDecoder::Stream {
  grpc::ClientContext context;
  std::unique_ptr<v1::Retriever::Stub> stub;
  std::unique_ptr<grpc::ClientReaderWriter<v1::RetrieverRequest, v1::RetrieverResponse>> rw;
  uint64_t generation = 0;
  v1::RetrieverInfo info;  // the retriever's GetInfo at connect (its head's needs and limits)
  std::thread reader;
  absl::Mutex mu;
  std::deque<v1::RetrieverResponse> inbox ABSL_GUARDED_BY(mu);
  bool broken ABSL_GUARDED_BY(mu) = false;
  std::atomic<bool> resynced{false};  // engine thread: live sequences re-opened on it
  // Engine thread: a malformed answer was logged. A retriever that keeps sending them would log
  // every step; the fallback counter still counts each one.
  bool malformed_logged = false;
};

}  // namespace specontext::generator
