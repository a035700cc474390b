#include "core/status_http.h"

#include "core/echo.h"

namespace specontext {
namespace {

// Same bound as the gRPC mapping: a message echoing a huge rejected value stays small.
constexpr size_t kMaxErrorMessageBytes = 1024;

}  // namespace

HttpError ToHttpError(const absl::Status& status) {
  HttpError e;
  if (status.ok()) return e;
  e.message = TruncateForEcho(status.message(), kMaxErrorMessageBytes);
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition: e.http_status = 400; e.type = "invalid_request_error"; break;
    case absl::StatusCode::kUnauthenticated: e.http_status = 401; e.type = "authentication_error"; break;
    case absl::StatusCode::kPermissionDenied: e.http_status = 403; e.type = "permission_error"; break;
    case absl::StatusCode::kNotFound: e.http_status = 404; e.type = "invalid_request_error"; break;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted: e.http_status = 409; e.type = "invalid_request_error"; break;
    case absl::StatusCode::kResourceExhausted: e.http_status = 429; e.type = "rate_limit_error"; break;
    case absl::StatusCode::kCancelled: e.http_status = 499; e.type = "cancelled"; break;
    case absl::StatusCode::kUnimplemented: e.http_status = 501; e.type = "server_error"; break;
    case absl::StatusCode::kUnavailable: e.http_status = 503; e.type = "server_error"; break;
    case absl::StatusCode::kDeadlineExceeded: e.http_status = 504; e.type = "timeout_error"; break;
    default: e.http_status = 500; e.type = "server_error"; break;
  }
  return e;
}

}  // namespace specontext
