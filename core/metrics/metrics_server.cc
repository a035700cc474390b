#include "core/metrics/metrics_server.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/metrics/connection_threads.h"
#include "core/status_macros.h"
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
  if (listener_.started()) return absl::FailedPreconditionError("metrics: server already started");
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
  listener_.Configure(server.get(), options_.max_connections);
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
  RETURN_IF_ERROR(listener_.Listen(std::move(server), host_, port_));
  SPC_LOG(INFO) << "metrics: serving" << Kv("host", host_) << Kv("port", listener_.port())
                << Kv("tls", tls);
  return absl::OkStatus();
}

void MetricsServer::Stop() { listener_.Stop(); }

}  // namespace specontext::metrics
