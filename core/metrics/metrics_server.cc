#include "core/metrics/metrics_server.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "httplib.h"

namespace specontext::metrics {
namespace {

// Content-Type of the text exposition format 0.0.4.
constexpr char kExpositionContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// cpp-httplib serves each accepted connection as one job of its task queue, and a job holds its
// thread while the connection is open (idle or mid-request). A fixed pool of a few threads is
// therefore blocked by a few slow or idle clients; this queue gives every connection a thread of
// its own, started on demand, up to `max_threads`. Past that, jobs wait in FIFO order. A thread
// with no job for kRetireAfter exits.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(int max_threads) : max_threads_(std::max(1, max_threads)) {}
  ~ConnectionThreads() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::lock_guard<std::mutex> lock(mu_);
    JoinRetired();
    jobs_.push_back(std::move(fn));
    if (jobs_.size() <= static_cast<size_t>(idle_)) {
      cv_.notify_one();
    } else if (static_cast<int>(threads_.size()) < max_threads_) {
      std::thread t([this] { Work(); });
      const std::thread::id id = t.get_id();
      threads_.emplace(id, std::move(t));
    }
  }

  // Finishes the queued jobs (the server's listening socket is closed by now, so they return at
  // once) and joins every thread. Idempotent.
  void shutdown() override {
    std::map<std::thread::id, std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_ = true;
      threads.swap(threads_);
      for (std::thread& t : retired_) threads.emplace(t.get_id(), std::move(t));
      retired_.clear();
    }
    cv_.notify_all();
    for (auto& [id, t] : threads) t.join();
  }

 private:
  static constexpr std::chrono::seconds kRetireAfter{10};

  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait_for(lock, kRetireAfter, [this] { return shutdown_ || !jobs_.empty(); });
      --idle_;
      if (jobs_.empty()) break;  // shut down, or idle for kRetireAfter
      std::function<void()> fn = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
    // Hand this thread's handle to the next enqueue() (or shutdown()) to join.
    if (auto it = threads_.find(std::this_thread::get_id()); it != threads_.end()) {
      retired_.push_back(std::move(it->second));
      threads_.erase(it);
    }
  }

  void JoinRetired() {
    for (std::thread& t : retired_) t.join();  // each has left Work(): only returning is left
    retired_.clear();
  }

  const int max_threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::map<std::thread::id, std::thread> threads_;
  std::vector<std::thread> retired_;
  int idle_ = 0;
  bool shutdown_ = false;
};

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
