// TLS and mutual TLS on the generator: certificates made fresh by openssl for each run; a client with
// the right CA and certificate is served, one without a certificate or speaking plaintext is not.
#include <filesystem>
#include <random>

#include <gtest/gtest.h>

#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

TEST(GeneratorTls, MutualTlsServesOnlyClientsWithACertificate) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed";
  const std::string certs = "/tmp/spc_tls_" + std::to_string(std::random_device{}());
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  const std::string script =
      "set -e; cd " + certs +
      "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=spc-test-ca"
      "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
      "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
      "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 "
      "-extfile san.ext"
      "; openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=spc-client"
      "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1";
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

}  // namespace
}  // namespace specontext::testing
