// TLS and mutual TLS on the generator: certificates made fresh by openssl for each run; a client with
// the right CA and certificate is served, one without a certificate or speaking plaintext is not; under
// mutual TLS a client is keyed by its certificate for the per-client limit.
#include <filesystem>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate (CN spc-client) in `certs`.
std::string MakeCertsScript(const std::string& certs) {
  return "set -e; cd " + certs +
         "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=spc-test-ca"
         "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
         "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
         "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 "
         "-extfile san.ext"
         "; openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=spc-client"
         "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1";
}

TEST(GeneratorTls, MutualTlsServesOnlyClientsWithACertificate) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed";
  const std::string certs = "/tmp/spc_tls_" + std::to_string(std::random_device{}());
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  const std::string script = MakeCertsScript(certs);
  int code = -1;
  RunCommand({"/bin/sh", "-c", script + " >/dev/null 2>&1"}, &code);
  ASSERT_EQ(code, 0) << "openssl failed";

  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN,
                                 {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin", "--backend",
                                  "cpu", "--threads", "1", "--log-level", "warning", "--tls-cert",
                                  certs + "/server.pem", "--tls-key", certs + "/server.key", "--tls-client-ca",
                                  certs + "/ca.pem"});
  ASSERT_TRUE(st.ok()) << st;
  const std::vector<std::string> base = {SPC_CLIENT_BIN, "generate", "--addr", server.address(), "--prompt",
                                         "Once upon a time", "--max-new-tokens", "6", "--timeout-s", "20"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  };
  // Mutual TLS: served.
  const std::string text = RunCommand(with({"--tls-ca", certs + "/ca.pem", "--tls-cert", certs + "/client.pem",
                                            "--tls-key", certs + "/client.key", "--tls-server-name", "localhost"}),
                                      &code);
  EXPECT_EQ(code, 0);
  EXPECT_GT(text.size(), 1u);
  // TLS without a client certificate: refused.
  RunCommand(with({"--tls-ca", certs + "/ca.pem", "--tls-server-name", "localhost"}), &code);
  EXPECT_NE(code, 0);
  // Plaintext: refused.
  RunCommand(base, &code);
  EXPECT_NE(code, 0);
  EXPECT_TRUE(server.Running());
}

// Under mutual TLS a client is its certificate's identity, not its address: the per-client limit names
// it ("tls:spc-client") when concurrent calls of that client pass --max-requests-per-peer.
TEST(GeneratorTls, MutualTlsClientsAreKeyedByTheirCertificate) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed";
  const std::string certs = "/tmp/spc_tls_" + std::to_string(std::random_device{}());
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  int code = -1;
  RunCommand({"/bin/sh", "-c", MakeCertsScript(certs) + " >/dev/null 2>&1"}, &code);
  ASSERT_EQ(code, 0) << "openssl failed";
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN,
                                 {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin", "--backend",
                                  "cpu", "--threads", "1", "--log-level", "warning", "--max-batch", "1",
                                  "--max-requests-per-peer", "1", "--tls-cert", certs + "/server.pem", "--tls-key",
                                  certs + "/server.key", "--tls-client-ca", certs + "/ca.pem"});
  ASSERT_TRUE(st.ok()) << st;
  constexpr int kCalls = 6;
  std::vector<std::string> outputs(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      int c = -1;
      outputs[i] = RunCommand({"/bin/sh", "-c",
                               "exec \"$@\" 2>&1", "sh", SPC_CLIENT_BIN, "generate", "--addr", server.address(),
                               "--prompt", "Once upon a time", "--max-new-tokens", "400", "--ignore-eos",
                               "--timeout-s", "60", "--tls-ca", certs + "/ca.pem", "--tls-cert", certs + "/client.pem",
                               "--tls-key", certs + "/client.key", "--tls-server-name", "localhost"},
                              &c);
    });
  }
  for (auto& t : threads) t.join();
  int refused = 0;
  for (const std::string& out : outputs) {
    if (out.find("--max-requests-per-peer") == std::string::npos) continue;
    ++refused;
    EXPECT_NE(out.find("tls:spc-client"), std::string::npos) << out;
  }
  EXPECT_GE(refused, 1) << "6 calls of 400 tokens at once never had more than one in flight";
}

}  // namespace
}  // namespace specontext::testing
