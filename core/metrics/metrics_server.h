// MetricsServer: serves a Registry over HTTP (or HTTPS) on its own port and threads (cpp-httplib):
//   GET /metrics  -> Registry::Serialize() as text/plain; version=0.0.4
//   GET /healthz  -> 200 "ok" (or 503 "not ready" while the readiness callback says false)
//
// Health and metrics stay answerable under idle or slow clients: every connection has a thread of
// its own up to `max_connections` (threads start on demand and retire when idle), an idle
// connection is closed after `idle_timeout`, a read or write that stalls for `io_timeout` drops the
// connection. Past `max_connections`, connections wait in accept order for a thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "core/metrics/http_listener.h"
#include "core/metrics/metrics.h"

namespace httplib {
class Server;
}

namespace specontext::metrics {

struct MetricsServerOptions {
  /// PEM certificate chain and private key: both set serves HTTPS, both empty plain HTTP.
  std::string tls_cert_file;
  std::string tls_key_file;
  /// Connections served at once (one thread each).
  int max_connections = 512;
  /// Longest wait for a request on an open connection (whole seconds: cpp-httplib's keep-alive).
  std::chrono::seconds idle_timeout{1};
  /// Longest stall of one read or write.
  std::chrono::milliseconds io_timeout{2000};
};

class MetricsServer {
 public:
  /// `registry` must outlive the server. `port` 0 picks a free port (see port()).
  MetricsServer(const Registry* registry, std::string host, int port,
                MetricsServerOptions options = {});
  ~MetricsServer();  // Stop()s
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  /// Optional; call before Start(). /healthz answers 503 while `ready` returns false.
  void SetReadiness(std::function<bool()> ready) { ready_ = std::move(ready); }

  /// Binds host:port (Unavailable when the port is in use or the host is invalid; InvalidArgument
  /// when only one of the TLS files is given or they cannot be loaded) and serves on background
  /// threads. Returns once the server accepts connections.
  absl::Status Start();
  /// Stops serving and joins the threads. Idempotent.
  void Stop();
  /// The bound port (the real one when constructed with 0); -1 before Start().
  int port() const { return listener_.port(); }

 private:
  const Registry* registry_;
  std::string host_;
  int port_;
  MetricsServerOptions options_;
  std::function<bool()> ready_;
  HttpListener listener_{"metrics"};
};

}  // namespace specontext::metrics
