#include "tools/client/channel.h"

#include <fstream>
#include <sstream>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/str_cat.h"

namespace specontext::client {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& o) {
  if (o.address.empty()) return absl::InvalidArgumentError("--addr is required (HOST:PORT)");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(o.max_message_bytes);
  args.SetMaxSendMessageSize(o.max_message_bytes);
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (o.tls_ca_path.empty()) {
    if (!o.tls_cert_path.empty()) return absl::InvalidArgumentError("--tls-cert needs --tls-ca");
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    auto ca = ReadFile(o.tls_ca_path);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (!o.tls_cert_path.empty() || !o.tls_key_path.empty()) {
      if (o.tls_cert_path.empty() || o.tls_key_path.empty()) {
        return absl::InvalidArgumentError("--tls-cert and --tls-key must be given together");
      }
      auto cert = ReadFile(o.tls_cert_path);
      if (!cert.ok()) return cert.status();
      auto key = ReadFile(o.tls_key_path);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
    creds = grpc::SslCredentials(ssl);
  }
  return grpc::CreateCustomChannel(o.address, creds, args);
}

}  // namespace specontext::client
