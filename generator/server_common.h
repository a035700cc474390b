// Pieces every SpeContext gRPC server binary shares: credentials (TLS, mutual TLS), the standard
// health and reflection services, the readiness file tests wait for, and SIGTERM handling.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/status/statusor.h"
#include "core/cli/args.h"

namespace specontext {

struct TlsOptions {
  std::string cert_path;       // PEM server certificate chain; empty = plaintext
  std::string key_path;        // PEM private key
  std::string client_ca_path;  // PEM CA: when set, clients must present a certificate it signed (mTLS)
};

/// Insecure credentials when no certificate is given; InvalidArgument when only one of cert/key is
/// set or a client CA is given without a certificate; NotFound naming an unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& tls);

/// A client's side of TLS (the generator's link to a retriever).
struct ClientTlsOptions {
  std::string ca_path;      // PEM roots the server's certificate must chain to; empty = plaintext
  std::string cert_path;    // PEM client certificate (mutual TLS), with key_path
  std::string key_path;
};

/// Insecure channel credentials when no CA is given, else TLS (mutual when a certificate is given).
/// InvalidArgument for a certificate without its key or without a CA; NotFound naming an unreadable file.
/// `flag_prefix` names the flags in messages ("--retriever-tls-").
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const ClientTlsOptions& tls,
                                                                               const std::string& flag_prefix);

/// The gRPC message size flag `--name` (e.g. "max-message-bytes"): bytes in [1KiB, 1GiB] (gRPC's limits are
/// ints), else InvalidArgument naming the flag.
absl::StatusOr<int64_t> MessageBytesFlag(const Args& args, const std::string& name);

/// Makes servers built by `builder` fail to start on a port another socket is bound to. gRPC turns
/// SO_REUSEPORT on by default, so a second server on a busy port would start and silently take part
/// of the first one's connections.
void RefusePortSharing(grpc::ServerBuilder* builder);

/// Enables grpc.health.v1.Health and server reflection for builders created afterwards.
void EnableStandardServices();

/// Blocks SIGTERM and SIGINT in the calling thread (call first in main, before any thread starts, so
/// every thread inherits the mask), to be received by WaitForTerminationSignal().
void BlockTerminationSignals();
/// Waits for SIGTERM or SIGINT; returns the signal number.
int WaitForTerminationSignal();

/// Writes "grpc_port metrics_port\n" (or "grpc_port metrics_port http_port\n" when `http_port` >= 0) to `path` atomically (a temporary file beside it, written,
/// synced and closed, then renamed over it), so a test or supervisor that polls for the file sees
/// it complete or not at all. Every step is checked: a full disk or a missing directory is an error
/// naming the path and the cause (the caller must not report serving then). A no-op when `path` is
/// empty.
absl::Status WritePortFile(const std::string& path, int grpc_port, int metrics_port, int http_port = -1);
/// Removes the port file an earlier run left (a missing file is fine), before anything can fail: a
/// supervisor waiting for the file must not read a dead server's ports.
absl::Status RemoveStalePortFile(const std::string& path);

/// Reads a whole file (NotFound naming it when it cannot be opened).
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

/// The name a service reports for the model or retrieval head at `path` (GetModelInfo, GetInfo): a
/// directory's name, or a file's name without its extension (a checkpoint file inside an HF directory:
/// the directory's). Never the path itself, which would tell any client the server's file layout.
std::string ArtifactNameFromPath(const std::string& path);

}  // namespace specontext
