// OpenAiHttpServer: the OpenAI-compatible HTTP front end of the generation service, on its own port
// (--http-port) over the same GeneratorService core as gRPC: the same validation, limits, admission,
// draining and metrics. Endpoints:
//   POST /v1/completions, POST /v1/chat/completions (stream: true -> server-sent events)
//   GET  /v1/models
// Errors are OpenAI's {"error": {...}} with the HTTP code of core/status_http.h. Every connection
// has a thread of its own (core/metrics/connection_threads.h); a streaming client that disconnects
// cancels its request.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "core/metrics/http_listener.h"
#include "generator/generator_service.h"

namespace httplib {
class Server;
}

namespace specontext::generator {

struct OpenAiHttpOptions {
  std::string tls_cert_file;       // --tls-cert / --tls-key: HTTPS
  std::string tls_key_file;
  std::string tls_client_ca_file;  // --tls-client-ca: client certificates required
  int64_t max_body_bytes = 4 << 20;  // larger bodies get 413
  int max_connections = 512;
  std::chrono::seconds idle_timeout{5};
  std::chrono::milliseconds io_timeout{10000};  // longest stall of one read or write
};

class OpenAiHttpServer {
 public:
  /// `service` must outlive the server.
  OpenAiHttpServer(GeneratorService* service, std::string host, int port, OpenAiHttpOptions options);
  ~OpenAiHttpServer();  // Stop()s
  OpenAiHttpServer(const OpenAiHttpServer&) = delete;
  OpenAiHttpServer& operator=(const OpenAiHttpServer&) = delete;

  /// Binds host:port (0 picks a free one) and serves on background threads. Unavailable when the
  /// port is in use; InvalidArgument when the TLS files cannot be loaded.
  absl::Status Start();
  /// Stops accepting and joins the threads. Idempotent.
  void Stop();
  int port() const { return listener_.port(); }

 private:
  GeneratorService* service_;
  std::string host_;
  int port_;
  OpenAiHttpOptions options_;
  metrics::HttpListener listener_{"http"};
};

}  // namespace specontext::generator
