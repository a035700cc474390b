#include "core/status_grpc.h"

#include <string>

#include "core/echo.h"

namespace specontext {
namespace {

// Both enums follow google.rpc.Code: 0 OK .. 16 UNAUTHENTICATED.
constexpr int kMaxCanonicalCode = 16;

// The message travels percent-encoded in an HTTP/2 trailer; past the peer's metadata limit (8 KiB
// by default) the call fails with another code and the message is lost, so a message that holds a
// large echoed value is cut well below it.
constexpr size_t kMaxStatusMessageBytes = 1024;

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const int code = static_cast<int>(status.code());
  const grpc::StatusCode grpc_code =
      code > 0 && code <= kMaxCanonicalCode ? static_cast<grpc::StatusCode>(code) : grpc::StatusCode::UNKNOWN;
  return grpc::Status(grpc_code, TruncateForEcho(status.message(), kMaxStatusMessageBytes));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  const int code = static_cast<int>(status.error_code());
  const absl::StatusCode absl_code =
      code > 0 && code <= kMaxCanonicalCode ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown;
  return absl::Status(absl_code, status.error_message());
}

}  // namespace specontext
