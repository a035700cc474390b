// Both services' /metrics pass `promtool check metrics`, and a real Prometheus scrapes both and
// answers a query about each through its HTTP API.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <httplib.h>

#include "absl/time/clock.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

std::string FindTool(const char* name) {
  for (const char* dir : {"/usr/bin/", "/usr/local/bin/"}) {
    const std::string p = std::string(dir) + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

class ServicesMetrics : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = ModelDir();
    if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
    rng_.seed(std::random_device{}());
    head_dir_ = WriteRandomHead(rng_);
    absl::Status st = generator_.Start(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer",
                                                           dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                                           "--log-level", "warning"});
    ASSERT_TRUE(st.ok()) << st;
    st = retriever_.Start(SPC_RETRIEVER_BIN, {"--head", head_dir_, "--log-level", "warning"});
    ASSERT_TRUE(st.ok()) << st;
    // Some traffic on both, so histograms and labelled counters have children.
    auto stub = GeneratorStub(generator_.address());
    v1::GenerateRequest req;
    req.set_prompt("Once upon a time");
    req.set_max_new_tokens(8);
    ASSERT_TRUE(CallGenerate(stub.get(), req).status.ok());
    auto rstub = v1::Retriever::NewStub(grpc::CreateChannel(retriever_.address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    auto stream = rstub->Session(&ctx);
    v1::RetrieverRequest r;
    r.mutable_open()->set_sequence_id(1);
    r.mutable_open()->set_max_tokens(64);
    ASSERT_TRUE(stream->Write(r));
    r.Clear();
    r.mutable_observe()->set_sequence_id(1);
    for (int i = 0; i < 9; ++i) r.mutable_observe()->add_token_ids(static_cast<int32_t>(rng_() % 512));
    ASSERT_TRUE(stream->Write(r));
    r.Clear();
    v1::Observe* o = r.mutable_observe_batch()->add_observes();
    o->set_sequence_id(1);
    for (int i = 0; i < 5; ++i) o->add_token_ids(static_cast<int32_t>(rng_() % 512));
    ASSERT_TRUE(stream->Write(r));
    r.Clear();
    r.mutable_select()->add_sequence_ids(1);
    r.mutable_select()->set_budget(4);
    ASSERT_TRUE(stream->Write(r));
    v1::RetrieverResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    stream->WritesDone();
    ASSERT_TRUE(stream->Finish().ok());
  }
  void TearDown() override { std::filesystem::remove_all(head_dir_); }

  std::mt19937 rng_;
  std::string head_dir_;
  ServerProcess generator_, retriever_;
};

TEST_F(ServicesMetrics, PromtoolAcceptsBothExpositions) {
  const std::string promtool = FindTool("promtool");
  if (promtool.empty()) GTEST_SKIP() << "promtool not installed (Debian package prometheus)";
  for (ServerProcess* s : {&generator_, &retriever_}) {
    auto body = FetchMetrics(s->metrics_port());
    ASSERT_TRUE(body.ok());
    const std::string path = head_dir_ + "/metrics_" + std::to_string(s->metrics_port()) + ".txt";
    std::ofstream(path) << *body;
    int code = -1;
    const std::string out = RunCommand({"/bin/sh", "-c", promtool + " check metrics < " + path + " 2>&1"}, &code);
    EXPECT_EQ(code, 0) << out;
  }
  auto gen = FetchMetrics(generator_.metrics_port());
  EXPECT_THAT(*gen, ::testing::HasSubstr("spc_time_per_output_token_seconds_bucket"));
  auto ret = FetchMetrics(retriever_.metrics_port());
  EXPECT_GE(MetricValue(*ret, "spc_retrieval_latency_seconds_count").value_or(0), 1);
  // Single observes and batches are counted apart.
  EXPECT_EQ(MetricValue(*ret, "spc_retriever_messages_total{kind=\"observe\"}").value_or(-1), 1);
  EXPECT_EQ(MetricValue(*ret, "spc_retriever_messages_total{kind=\"observe_batch\"}").value_or(-1), 1);
}

TEST_F(ServicesMetrics, PrometheusScrapesBothServices) {
  const std::string prometheus = FindTool("prometheus");
  if (prometheus.empty()) GTEST_SKIP() << "prometheus not installed";
  const std::string config = head_dir_ + "/prometheus.yml";
  std::ofstream(config) << "global:\n  scrape_interval: 1s\nscrape_configs:\n"
                        << "  - job_name: generator\n    static_configs:\n      - targets: ['127.0.0.1:"
                        << generator_.metrics_port() << "']\n"
                        << "  - job_name: retriever\n    static_configs:\n      - targets: ['127.0.0.1:"
                        << retriever_.metrics_port() << "']\n";
  const int port = FreePort();
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string log = head_dir_ + "/prometheus.log";
    std::FILE* f = std::fopen(log.c_str(), "w");
    if (f != nullptr) {
      dup2(fileno(f), STDOUT_FILENO);
      dup2(fileno(f), STDERR_FILENO);
    }
    const std::string cfg = "--config.file=" + config, data = "--storage.tsdb.path=" + head_dir_ + "/tsdb",
                      listen = "--web.listen-address=127.0.0.1:" + std::to_string(port);
    execl(prometheus.c_str(), prometheus.c_str(), cfg.c_str(), data.c_str(), listen.c_str(), nullptr);
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  httplib::Client client("127.0.0.1", port);
  bool gen_seen = false, ret_seen = false;
  const absl::Time give_up = absl::Now() + absl::Seconds(90);
  while (absl::Now() < give_up && !(gen_seen && ret_seen)) {
    absl::SleepFor(absl::Milliseconds(500));
    if (!gen_seen) {
      auto res = client.Get("/api/v1/query?query=spc_generator_requests_total%7Bcode%3D%22OK%22%7D");
      gen_seen = res && res->status == 200 && res->body.find("\"job\":\"generator\"") != std::string::npos &&
                 res->body.find("\"value\":[") != std::string::npos;
    }
    if (!ret_seen) {
      auto res = client.Get("/api/v1/query?query=spc_retrieval_latency_seconds_count");
      ret_seen = res && res->status == 200 && res->body.find("\"job\":\"retriever\"") != std::string::npos;
    }
  }
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  EXPECT_TRUE(gen_seen) << "Prometheus never returned the generator's request counter";
  EXPECT_TRUE(ret_seen) << "Prometheus never returned the retriever's latency histogram";
}

}  // namespace
}  // namespace specontext::testing
