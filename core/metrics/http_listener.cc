#include "core/metrics/http_listener.h"

#include <sys/socket.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/metrics/connection_threads.h"
#include "httplib.h"

namespace specontext::metrics {

HttpListener::HttpListener(std::string name) : name_(std::move(name)) {}

HttpListener::~HttpListener() { Stop(); }

void HttpListener::Configure(httplib::Server* server, int max_connections) {
  std::shared_ptr<int> listen_fd = listen_fd_;
  server->set_socket_options([listen_fd](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *listen_fd = sock;
  });
  server->new_task_queue = [max_connections] { return new ConnectionThreads(max_connections); };
}

absl::Status HttpListener::Listen(std::unique_ptr<httplib::Server> server, const std::string& host,
                                  int port) {
  int bound = port;
  if (bound == 0) {
    bound = server->bind_to_any_port(host);
  } else if (!server->bind_to_port(host, bound)) {
    bound = -1;
  }
  if (bound < 0) {
    return absl::UnavailableError(absl::StrCat(name_, ": cannot listen on ", host, ":", port,
                                               " (port in use or address invalid)"));
  }
  // cpp-httplib listens with a backlog of 5: a burst of connections would see SYNs dropped (and
  // retried only after a second) while the accept thread catches up. Listening again raises it.
  if (*listen_fd_ >= 0) ::listen(*listen_fd_, SOMAXCONN);
  bound_port_ = bound;
  httplib::Server* raw = server.get();
  server_ = std::move(server);
  thread_ = std::thread([raw] { raw->listen_after_bind(); });
  // stop() is a no-op until the listen loop runs; wait for it so an early Stop() cannot hang.
  for (int i = 0; i < 5000 && !raw->is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return absl::OkStatus();
}

void HttpListener::Stop() {
  if (server_ == nullptr) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
  server_.reset();
}

}  // namespace specontext::metrics
