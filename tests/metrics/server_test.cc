// MetricsServer over loopback with cpp-httplib's client: /metrics, /healthz, port handling, slow
// and idle clients, HTTPS.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "core/metrics/metrics.h"
#include "core/metrics/metrics_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace specontext::metrics {
namespace {

using ::testing::HasSubstr;

// A TCP connection to 127.0.0.1:port that sends `bytes` (may be empty) and then nothing; -1 on
// error.
int OpenConnection(int port, const std::string& bytes) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      (!bytes.empty() &&
       send(fd, bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size()))) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST(MetricsServerTest, ServesMetricsAndHealth) {
  Registry reg;
  auto* c = *reg.AddCounter("spc_requests_total", "Requests.", {"code"});
  std::mt19937_64 rng(std::random_device{}());
  const int n = 1 + rng() % 1000;
  (*c->WithLabels({"OK"}))->Increment(n);
  std::atomic<bool> ready{false};
  MetricsServer server(&reg, "127.0.0.1", 0);
  server.SetReadiness([&ready] { return ready.load(); });
  ASSERT_TRUE(server.Start().ok());
  ASSERT_GT(server.port(), 0);
  httplib::Client client("127.0.0.1", server.port());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(res->body, reg.Serialize());
  EXPECT_THAT(res->body, HasSubstr("spc_requests_total{code=\"OK\"} " + std::to_string(n) + "\n"));
  // Updates show up in the next scrape.
  (*c->WithLabels({"UNAVAILABLE"}))->Increment();
  res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_THAT(res->body, HasSubstr("spc_requests_total{code=\"UNAVAILABLE\"} 1\n"));
  res = client.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  ready = true;
  res = client.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ok\n");
  res = client.Get("/nope");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  server.Stop();
  server.Stop();  // idempotent
  EXPECT_FALSE(client.Get("/metrics"));
}

TEST(MetricsServerTest, PortInUseIsAnErrorAndPortIsReusableAfterStop) {
  Registry reg;
  MetricsServer first(&reg, "127.0.0.1", 0);
  ASSERT_TRUE(first.Start().ok());
  const int port = first.port();
  MetricsServer second(&reg, "127.0.0.1", port);
  absl::Status st = second.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr(std::to_string(port)));
  EXPECT_EQ(first.Start().code(), absl::StatusCode::kFailedPrecondition);
  first.Stop();
  MetricsServer third(&reg, "127.0.0.1", port);
  ASSERT_TRUE(third.Start().ok());
  EXPECT_EQ(third.port(), port);
  httplib::Client client("127.0.0.1", port);
  EXPECT_TRUE(client.Get("/healthz"));
}

TEST(MetricsServerTest, BadHostAndImmediateStop) {
  Registry reg;
  MetricsServer bad(&reg, "not-an-address.invalid", 0);
  EXPECT_EQ(bad.Start().code(), absl::StatusCode::kUnavailable);
  for (int i = 0; i < 5; ++i) {  // Stop right after Start must not hang
    MetricsServer s(&reg, "127.0.0.1", 0);
    ASSERT_TRUE(s.Start().ok());
    s.Stop();
  }
}

// Health and metrics stay answerable while 3 clients sit in a partial request and 500 hold idle
// connections (with 2 worker threads and 5 s timeouts this took tens of seconds).
TEST(MetricsServerTest, AnswersUnderSlowAndIdleConnections) {
  constexpr int kSlow = 3, kIdle = 500;
  rlimit lim{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &lim), 0);
  // This process holds both ends of every connection.
  if (lim.rlim_cur < 4 * (kSlow + kIdle)) {
    lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4 * (kSlow + kIdle));
    ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &lim), 0);
    if (lim.rlim_cur < 4 * (kSlow + kIdle)) GTEST_SKIP() << "open file limit too low";
  }
  Registry reg;
  auto* c = *reg.AddCounter("spc_requests_total", "Requests.", {"code"});
  (*c->WithLabels({"OK"}))->Increment();
  MetricsServer server(&reg, "127.0.0.1", 0);
  ASSERT_TRUE(server.Start().ok());
  std::vector<int> fds;
  for (int i = 0; i < kSlow; ++i) {
    fds.push_back(OpenConnection(server.port(), "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"));
  }
  for (int i = 0; i < kIdle; ++i) fds.push_back(OpenConnection(server.port(), ""));
  for (int fd : fds) ASSERT_GE(fd, 0);
  httplib::Client client("127.0.0.1", server.port());
  client.set_connection_timeout(std::chrono::seconds(2));
  client.set_read_timeout(std::chrono::seconds(2));
  for (const char* path : {"/healthz", "/metrics", "/healthz"}) {
    const auto t0 = std::chrono::steady_clock::now();
    auto res = client.Get(path);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(res) << path << ": " << httplib::to_string(res.error()) << " after " << s << " s";
    EXPECT_EQ(res->status, 200) << path;
    EXPECT_LT(s, 2.0) << path;
  }
  for (int fd : fds) close(fd);
  server.Stop();
}

// Past max_connections, a connection waits for a thread; idle ones free theirs after idle_timeout.
TEST(MetricsServerTest, IdleConnectionsPastTheCapAreClosedInTime) {
  Registry reg;
  MetricsServerOptions options;
  options.max_connections = 2;
  MetricsServer server(&reg, "127.0.0.1", 0, options);
  ASSERT_TRUE(server.Start().ok());
  std::vector<int> fds;
  for (int i = 0; i < 6; ++i) fds.push_back(OpenConnection(server.port(), ""));
  for (int fd : fds) ASSERT_GE(fd, 0);
  httplib::Client client("127.0.0.1", server.port());
  client.set_read_timeout(std::chrono::seconds(10));
  const auto t0 = std::chrono::steady_clock::now();
  auto res = client.Get("/healthz");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  // 6 idle connections on 2 threads: about 3 rounds of the 1 s idle timeout, far below 10 s.
  EXPECT_LT(s, 6.0);
  // The server closed them: reading gives end of file.
  char byte;
  for (int fd : fds) {
    EXPECT_EQ(recv(fd, &byte, 1, 0), 0);
    close(fd);
  }
}

// A fresh CA and a server certificate for localhost/127.0.0.1 signed by it, in a new directory:
// ca.pem, server.pem, server.key. Empty when openssl is missing or fails.
std::string MakeCertificates(const std::string& name) {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0) return "";
  const std::string dir = ::testing::TempDir() + name + "_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  const std::string script =
      "set -e; cd " + dir +
      "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj "
      "/CN=spc-test-ca"
      "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
      "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
      "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
      "-days 1 -extfile san.ext";
  if (std::system(("(" + script + ") >/dev/null 2>&1").c_str()) != 0) return "";
  return dir;
}

TEST(MetricsServerTest, ServesHttpsWithTheGivenCertificate) {
  const std::string dir = MakeCertificates("metrics_tls");
  if (dir.empty()) GTEST_SKIP() << "openssl not installed or failed";
  Registry reg;
  auto* c = *reg.AddCounter("spc_requests_total", "Requests.", {"code"});
  (*c->WithLabels({"OK"}))->Increment(7);

  // Both files or neither; unreadable ones fail Start().
  MetricsServer half(&reg, "127.0.0.1", 0,
                     {.tls_cert_file = dir + "/server.pem", .tls_key_file = ""});
  EXPECT_EQ(half.Start().code(), absl::StatusCode::kInvalidArgument);
  MetricsServer missing(&reg, "127.0.0.1", 0,
                        {.tls_cert_file = dir + "/nope.pem", .tls_key_file = dir + "/server.key"});
  EXPECT_EQ(missing.Start().code(), absl::StatusCode::kInvalidArgument);

  MetricsServer server(&reg, "127.0.0.1", 0,
                       {.tls_cert_file = dir + "/server.pem", .tls_key_file = dir + "/server.key"});
  ASSERT_TRUE(server.Start().ok());
  httplib::SSLClient https("localhost", server.port());
  https.set_ca_cert_path((dir + "/ca.pem").c_str());
  https.enable_server_certificate_verification(true);
  auto res = https.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, reg.Serialize());
  EXPECT_THAT(res->body, HasSubstr("spc_requests_total{code=\"OK\"} 7\n"));
  res = https.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->body, "ok\n");
  // Without the CA the certificate is not trusted; plain HTTP gets no answer.
  httplib::SSLClient untrusted("localhost", server.port());
  untrusted.set_ca_cert_path((dir + "/server.pem").c_str());  // not a CA
  untrusted.enable_server_certificate_verification(true);
  EXPECT_FALSE(untrusted.Get("/metrics"));
  httplib::Client plain("127.0.0.1", server.port());
  plain.set_read_timeout(std::chrono::seconds(3));
  auto plain_res = plain.Get("/metrics");
  EXPECT_TRUE(!plain_res || plain_res->status != 200);
  server.Stop();
  std::filesystem::remove_all(dir);
}

// A real Prometheus scrapes the HTTPS port, trusting only the test CA.
TEST(MetricsServerTest, PrometheusScrapesOverHttps) {
  if (std::system("command -v prometheus >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "prometheus not installed";
  const std::string dir = MakeCertificates("metrics_prom_tls");
  if (dir.empty()) GTEST_SKIP() << "openssl not installed or failed";
  Registry reg;
  (*reg.AddUnlabeledCounter("spc_tls_scrapes_total", "Scrapes over TLS."))->Increment(42);
  MetricsServer server(&reg, "127.0.0.1", 0,
                       {.tls_cert_file = dir + "/server.pem", .tls_key_file = dir + "/server.key"});
  ASSERT_TRUE(server.Start().ok());
  // Prometheus' own port: a free one picked by a throwaway server.
  int prom_port = -1;
  {
    MetricsServer probe(&reg, "127.0.0.1", 0);
    ASSERT_TRUE(probe.Start().ok());
    prom_port = probe.port();
  }
  std::ofstream(dir + "/prometheus.yml")
      << "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tls\n    scheme: https\n"
      << "    tls_config:\n      ca_file: " << dir << "/ca.pem\n      server_name: localhost\n"
      << "    static_configs:\n      - targets: ['127.0.0.1:" << server.port() << "']\n";
  const std::string cmd = "exec prometheus --config.file=" + dir +
                          "/prometheus.yml --storage.tsdb.path=" + dir +
                          "/tsdb --web.listen-address=127.0.0.1:" + std::to_string(prom_port) +
                          " >" + dir + "/prometheus.log 2>&1";
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  httplib::Client client("127.0.0.1", prom_port);
  bool seen = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!seen && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto res = client.Get("/api/v1/query?query=spc_tls_scrapes_total");
    seen = res && res->status == 200 && res->body.find("\"42\"]") != std::string::npos;
  }
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  EXPECT_TRUE(seen) << "Prometheus never returned the counter scraped over HTTPS; see " << dir
                    << "/prometheus.log";
  server.Stop();
  if (seen) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace specontext::metrics
