// A Retriever service on a loopback port of the test's own process (gRPC, plaintext), for the split-mode
// tests that drive a RemoteSparseDecoder against it.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "core/metrics/metrics.h"
#include "core/sparse/retrieval_head.h"
#include "retriever/retriever_service.h"

namespace specontext::testing {

struct InProcessRetriever {
  metrics::Registry registry;
  retriever::RetrieverMetrics metrics;
  std::unique_ptr<retriever::RetrieverService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  ~InProcessRetriever() {
    if (server != nullptr) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
};

/// Serves `head` (loaded from `path`) on 127.0.0.1 (a free port); null, with a test failure, when it cannot.
inline std::unique_ptr<InProcessRetriever> StartRetriever(const RetrievalHead* head, const std::string& path) {
  auto r = std::make_unique<InProcessRetriever>();
  auto m = retriever::RegisterRetrieverMetrics(&r->registry);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  r->metrics = *m;
  r->service = std::make_unique<retriever::RetrieverService>(head, path, retriever::SessionLimits{}, &r->metrics);
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &r->port);
  b.RegisterService(r->service.get());
  r->server = b.BuildAndStart();
  EXPECT_TRUE(r->server != nullptr && r->port > 0);
  return r->server != nullptr ? std::move(r) : nullptr;
}

}  // namespace specontext::testing
