#include "core/metrics/metrics_server.h"

#include <sys/socket.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "httplib.h"

namespace specontext::metrics {
namespace {

// Content-Type of the text exposition format 0.0.4.
constexpr char kExpositionContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

MetricsServer::MetricsServer(const Registry* registry, std::string host, int port)
    : registry_(registry), host_(std::move(host)), port_(port) {}

MetricsServer::~MetricsServer() { Stop(); }

absl::Status MetricsServer::Start() {
  if (server_ != nullptr) return absl::FailedPreconditionError("metrics: server already started");
  auto server = std::make_unique<httplib::Server>();
  // httplib's default also sets SO_REUSEPORT, which would let a second server silently share a
  // port that is in use; SO_REUSEADDR alone still allows quick restarts.
  server->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // Scrapes are rare and cheap: a couple of worker threads is plenty.
  server->new_task_queue = [] { return new httplib::ThreadPool(2); };
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
  bound_port_ = port;
  httplib::Server* raw = server.get();
  server_ = std::move(server);
  thread_ = std::thread([raw] { raw->listen_after_bind(); });
  // stop() is a no-op until the listen loop runs; wait for it so an early Stop() cannot hang.
  for (int i = 0; i < 5000 && !raw->is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  SPC_LOG(INFO) << "metrics: serving" << Kv("host", host_) << Kv("port", bound_port_);
  return absl::OkStatus();
}

void MetricsServer::Stop() {
  if (server_ == nullptr) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
  server_.reset();
}

}  // namespace specontext::metrics
