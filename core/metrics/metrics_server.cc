#include "core/metrics/metrics_server.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/metrics/connection_threads.h"
#include "httplib.h"

namespace specontext::metrics {
namespace {

// Content-Type of the text exposition format 0.0.4.
constexpr char kExpositionContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

MetricsServer::MetricsServer(const Registry* registry, std::string host, int port,
                             MetricsServerOptions options)
    : registry_(registry), host_(std::move(host)), port_(port), options_(std::move(options)) {}

MetricsServer::~MetricsServer() { Stop(); }

absl::Status MetricsServer::Start() {
  if (server_ != nullptr) return absl::FailedPreconditionError("metrics: server already started");
  const bool tls = !options_.tls_cert_file.empty() || !options_.tls_key_file.empty();
  std::unique_ptr<httplib::Server> server;
  if (tls) {
    if (options_.tls_cert_file.empty() || options_.tls_key_file.empty()) {
      return absl::InvalidArgumentError("metrics: TLS needs both a certificate and a key");
    }
    auto ssl = std::make_unique<httplib::SSLServer>(options_.tls_cert_file.c_str(),
                                                    options_.tls_key_file.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat("metrics: cannot load TLS certificate ",
                                                     options_.tls_cert_file, " and key ",
                                                     options_.tls_key_file));
    }
    server = std::move(ssl);
  } else {
    server = std::make_unique<httplib::Server>();
  }
  // httplib's default also sets SO_REUSEPORT, which would let a second server silently share a
  // port that is in use; SO_REUSEADDR alone still allows quick restarts.
  auto listen_fd = std::make_shared<int>(-1);  // the listening socket, seen when it is created
  server->set_socket_options([listen_fd](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *listen_fd = sock;
  });
  const int max_connections = options_.max_connections;
  server->new_task_queue = [max_connections] { return new ConnectionThreads(max_connections); };
  server->set_keep_alive_timeout(std::max<time_t>(1, options_.idle_timeout.count()));
  server->set_read_timeout(options_.io_timeout);
  server->set_write_timeout(options_.io_timeout);
  server->set_payload_max_length(64 << 10);  // GETs only
  const Registry* registry = registry_;
  server->Get("/metrics", [registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry->Serialize(), kExpositionContentType);
  });
  std::function<bool()> ready = ready_;
  server->Get("/healthz", [ready](const httplib::Request&, httplib::Response& res) {
    if (ready && !ready()) {
      res.status = 503;
      res.set_content("not ready\n", "text/plain");
    } else {
      res.set_content("ok\n", "text/plain");
    }
  });
  int port = port_;
  if (port == 0) {
    port = server->bind_to_any_port(host_);
  } else if (!server->bind_to_port(host_, port)) {
    port = -1;
  }
  if (port < 0) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", host_, ":", port_,
                                               " (port in use or address invalid)"));
  }
  // cpp-httplib listens with a backlog of 5: a burst of connections would see SYNs dropped (and
  // retried only after a second) while the accept thread catches up. Listening again raises it.
  if (*listen_fd >= 0) ::listen(*listen_fd, SOMAXCONN);
  bound_port_ = port;
  httplib::Server* raw = server.get();
  server_ = std::move(server);
  thread_ = std::thread([raw] { raw->listen_after_bind(); });
  // stop() is a no-op until the listen loop runs; wait for it so an early Stop() cannot hang.
  for (int i = 0; i < 5000 && !raw->is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  SPC_LOG(INFO) << "metrics: serving" << Kv("host", host_) << Kv("port", bound_port_)
                << Kv("tls", tls);
  return absl::OkStatus();
}

void MetricsServer::Stop() {
  if (server_ == nullptr) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
  server_.reset();
}

}  // namespace specontext::metrics
