// MetricsServer over loopback with cpp-httplib's client: /metrics, /healthz, port handling.
#include <atomic>
#include <random>

#include "core/metrics/metrics.h"
#include "core/metrics/metrics_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "httplib.h"

namespace specontext::metrics {
namespace {

using ::testing::HasSubstr;

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

}  // namespace
}  // namespace specontext::metrics
