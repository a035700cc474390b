#include "generator/server_common.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const ClientTlsOptions& tls,
                                                                               const std::string& flag_prefix) {
  if (tls.ca_path.empty()) {
    if (!tls.cert_path.empty() || !tls.key_path.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(flag_prefix, "cert and ", flag_prefix, "key need ", flag_prefix,
                                                     "ca"));
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  auto ca = ReadWholeFile(tls.ca_path);
  if (!ca.ok()) return ca.status();
  ssl.pem_root_certs = *std::move(ca);
  if (!tls.cert_path.empty() || !tls.key_path.empty()) {
    if (tls.cert_path.empty() || tls.key_path.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(flag_prefix, "cert and ", flag_prefix,
                                                     "key must be given together"));
    }
    auto cert = ReadWholeFile(tls.cert_path);
    if (!cert.ok()) return cert.status();
    auto key = ReadWholeFile(tls.key_path);
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *std::move(cert);
    ssl.pem_private_key = *std::move(key);
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& tls) {
  if (tls.cert_path.empty() && tls.key_path.empty()) {
    if (!tls.client_ca_path.empty()) {
      return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_path.empty() || tls.key_path.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key must be given together");
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  auto cert = ReadWholeFile(tls.cert_path);
  if (!cert.ok()) return cert.status();
  auto key = ReadWholeFile(tls.key_path);
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!tls.client_ca_path.empty()) {
    auto ca = ReadWholeFile(tls.client_ca_path);
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

void RefusePortSharing(grpc::ServerBuilder* builder) {
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
}

void EnableStandardServices() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
}

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

namespace {

absl::Status PortFileError(const std::string& what, const std::string& path, int err) {
  return absl::UnavailableError(
      absl::StrCat("cannot write the port file ", path, ": ", what, ": ", std::strerror(err)));
}

// Writes all of `data` to `fd` (short writes and EINTR retried); false with errno set on failure.
bool WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

absl::Status RemoveStalePortFile(const std::string& path) {
  if (path.empty()) return absl::OkStatus();
  if (::unlink(path.c_str()) == 0 || errno == ENOENT) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("cannot remove the port file ", path, " of an earlier run: ", std::strerror(errno)));
}

absl::Status WritePortFile(const std::string& path, int grpc_port, int metrics_port, int http_port) {
  if (path.empty()) return absl::OkStatus();
  // A unique name, so two processes given the same --port-file cannot interleave their writes.
  std::string tmp = path + ".XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) return PortFileError("cannot create a temporary file beside it", path, errno);
  const std::string text = http_port >= 0 ? absl::StrCat(grpc_port, " ", metrics_port, " ", http_port, "\n")
                                          : absl::StrCat(grpc_port, " ", metrics_port, "\n");
  const char* failed = nullptr;
  // mkstemp creates 0600; supervisors running as another user read the file.
  if (::fchmod(fd, 0644) != 0) failed = "fchmod";
  // On filesystems with delayed allocation a full disk shows only at fsync or close.
  if (failed == nullptr && !WriteAll(fd, text)) failed = "write";
  if (failed == nullptr && ::fsync(fd) != 0) failed = "fsync";
  const int err = errno;
  if (::close(fd) != 0 && failed == nullptr) {
    const int close_err = errno;
    ::unlink(tmp.c_str());
    return PortFileError("close", path, close_err);
  }
  if (failed != nullptr) {
    ::unlink(tmp.c_str());
    return PortFileError(failed, path, err);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rename_err = errno;
    ::unlink(tmp.c_str());
    return PortFileError("rename", path, rename_err);
  }
  return absl::OkStatus();
}

std::string ArtifactNameFromPath(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  if (ec) p = path;
  p = p.lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // "dir/" names dir
  if (fs::is_directory(p, ec)) return p.filename().string();
  const std::string ext = p.extension().string();
  if (ext == ".safetensors" || ext == ".json") return p.parent_path().filename().string();
  return p.stem().string();
}

absl::StatusOr<int64_t> MessageBytesFlag(const Args& args, const std::string& name) {
  ASSIGN_OR_RETURN(int64_t bytes, args.GetBytes(name));
  if (bytes < 1024 || bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be between 1KiB and 1GiB"));
  }
  return bytes;
}

}  // namespace specontext
