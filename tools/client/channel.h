// Client-side channel setup shared by specontext-client, specontext-loadgen and the service tests.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"

namespace specontext::client {

struct ChannelOptions {
  std::string address;        // HOST:PORT
  std::string tls_ca_path;    // PEM roots: use TLS when set
  std::string tls_cert_path;  // PEM client certificate (mutual TLS)
  std::string tls_key_path;
  std::string tls_server_name;  // override the name checked against the certificate
  int max_message_bytes = 64 << 20;
};

/// A channel to `options.address` (insecure unless a CA is given). InvalidArgument for an empty
/// address or a certificate without its key; NotFound naming an unreadable file.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options);

}  // namespace specontext::client
