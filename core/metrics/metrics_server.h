// MetricsServer: serves a Registry over HTTP on its own port and thread (cpp-httplib):
//   GET /metrics  -> Registry::Serialize() as text/plain; version=0.0.4
//   GET /healthz  -> 200 "ok" (or 503 "not ready" while the readiness callback says false)
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "core/metrics/metrics.h"

namespace httplib {
class Server;
}

namespace specontext::metrics {

class MetricsServer {
 public:
  /// `registry` must outlive the server. `port` 0 picks a free port (see port()).
  MetricsServer(const Registry* registry, std::string host, int port);
  ~MetricsServer();  // Stop()s
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  /// Optional; call before Start(). /healthz answers 503 while `ready` returns false.
  void SetReadiness(std::function<bool()> ready) { ready_ = std::move(ready); }

  /// Binds host:port (Unavailable when the port is in use or the host is invalid) and serves on a
  /// background thread. Returns once the server accepts connections.
  absl::Status Start();
  /// Stops serving and joins the thread. Idempotent.
  void Stop();
  /// The bound port (the real one when constructed with 0); -1 before Start().
  int port() const { return bound_port_; }

 private:
  const Registry* registry_;
  std::string host_;
  int port_;
  int bound_port_ = -1;
  std::function<bool()> ready_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace specontext::metrics
