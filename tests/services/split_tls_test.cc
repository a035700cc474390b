// Split mode over mutual TLS: a retriever serving TLS and requiring client certificates
// (--tls-client-ca) gives a generator that presents one (--retriever-tls-ca/-cert/-key) the same
// greedy output as the engine CLI's sparse run, and refuses a generator without one, which then
// serves every step on the fallback. Certificates are made fresh by openssl for each run.
#include <filesystem>
#include <random>

#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/services/sparse_fixture.h"

namespace specontext::testing {
namespace {

TEST_F(SparseServices, SplitModeOverMutualTls) {
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed";
  const std::string certs = "/tmp/spc_split_tls_" + std::to_string(std::random_device{}());
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  const std::string script =
      "set -e; cd " + certs +
      "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=spc-test-ca"
      "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
      "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
      "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 "
      "-extfile san.ext"
      "; openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=spc-generator"
      "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1";
  int code = -1;
  RunCommand({"/bin/sh", "-c", script + " >/dev/null 2>&1"}, &code);
  ASSERT_EQ(code, 0) << "openssl failed";

  ServerProcess ret;
  ASSERT_TRUE(ret.Start(SPC_RETRIEVER_BIN, {"--head", head_, "--log-level", "warning", "--tls-cert",
                                            certs + "/server.pem", "--tls-key", certs + "/server.key",
                                            "--tls-client-ca", certs + "/ca.pem"})
                  .ok());
  const int kNew = 40;
  auto generator_args = [&](bool client_cert) {
    std::vector<std::string> args = ModelArgs();
    for (const std::string& a : {std::string("--budget"), std::string("8"), std::string("--retriever-deadline-ms"),
                                 std::string("2000"), std::string("--retriever"), ret.address(),
                                 std::string("--retriever-tls-ca"), certs + "/ca.pem",
                                 std::string("--retriever-tls-server-name"), std::string("localhost")}) {
      args.push_back(a);
    }
    if (client_cert) {
      for (const std::string& a : {std::string("--retriever-tls-cert"), certs + "/client.pem",
                                   std::string("--retriever-tls-key"), certs + "/client.key"}) {
        args.push_back(a);
      }
    }
    return args;
  };
  {
    ServerProcess gen;
    ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, generator_args(true)).ok());
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (Metric(gen.metrics_port(), "spc_retriever_connected") != 1 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(50));
    }
    ASSERT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 1) << "mutual TLS to the retriever failed";
    StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.text + "\n", Cli(SparseCliArgs(8), kNew));
    EXPECT_EQ(r.final.sparsity().fallback_steps(), 0);
    EXPECT_EQ(r.final.sparsity().retrieval_steps(), kNew - 1);
  }
  {
    // TLS without a client certificate: the handshake fails, the generator never connects and every
    // sparse step falls back; the request still completes.
    ServerProcess gen;
    ASSERT_TRUE(gen.Start(SPC_GENERATOR_BIN, generator_args(false)).ok());
    StreamResult r = CallGenerate(GeneratorStub(gen.address()).get(), Request(kNew));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens.size(), static_cast<size_t>(kNew));
    EXPECT_EQ(Metric(gen.metrics_port(), "spc_retriever_connected"), 0);
    EXPECT_EQ(Metric(gen.metrics_port(), "spc_retrieval_remote_steps_total"), 0);
    EXPECT_GT(Metric(gen.metrics_port(), "spc_retrieval_fallback_steps_total"), 0);
  }
  // A TLS flag without a remote retriever is a startup error.
  std::vector<std::string> argv = {SPC_GENERATOR_BIN};
  for (const std::string& a : ModelArgs()) argv.push_back(a);
  for (const std::string& a : {std::string("--retriever-tls-ca"), certs + "/ca.pem", std::string("--listen"),
                               std::string("127.0.0.1:0"), std::string("--metrics-port"), std::string("0")}) {
    argv.push_back(a);
  }
  RunCommand(argv, &code);
  EXPECT_EQ(code, 1);
  EXPECT_TRUE(ret.Running());
}

}  // namespace
}  // namespace specontext::testing
