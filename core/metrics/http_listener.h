// HttpListener: how the project's cpp-httplib servers (/metrics + /healthz, the generator's
// OpenAI-compatible front end) listen: no SO_REUSEPORT, a thread per connection, a full backlog,
// the accept loop on its own thread, and a Stop() that cannot hang.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace httplib {
class Server;
}

namespace specontext::metrics {

class HttpListener {
 public:
  /// `name` prefixes error messages and logs ("metrics", "http").
  explicit HttpListener(std::string name);
  ~HttpListener();  // Stop()s
  HttpListener(const HttpListener&) = delete;
  HttpListener& operator=(const HttpListener&) = delete;

  /// Call on a new server before its routes: SO_REUSEADDR without SO_REUSEPORT (httplib's default
  /// would let a second server silently share a busy port) and connections served by
  /// ConnectionThreads(max_connections).
  void Configure(httplib::Server* server, int max_connections);
  /// Binds host:port (0 picks a free port; Unavailable when in use or the host is invalid), then
  /// serves on a thread of its own until Stop().
  absl::Status Listen(std::unique_ptr<httplib::Server> server, const std::string& host, int port);
  void Stop();
  bool started() const { return server_ != nullptr; }
  /// The bound port; -1 before Listen().
  int port() const { return bound_port_; }

 private:
  std::string name_;
  std::shared_ptr<int> listen_fd_ = std::make_shared<int>(-1);  // seen when the socket is created
  int bound_port_ = -1;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace specontext::metrics
