// The one place where library status codes meet HTTP status codes (the OpenAI-compatible front end;
// core/status_grpc.h is its gRPC twin). An error body follows OpenAI's shape:
//   {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}
#pragma once

#include <string>

#include "absl/status/status.h"

namespace specontext {

struct HttpError {
  int http_status = 200;  // 200 for OK
  std::string type;       // OpenAI's error.type: invalid_request_error, rate_limit_error, server_error, ...
  std::string message;    // the status message, cut to 1 KiB on a UTF-8 boundary
};

/// absl::Status -> HTTP status and OpenAI error type:
///   INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION -> 400 invalid_request_error
///   UNAUTHENTICATED -> 401 authentication_error; PERMISSION_DENIED -> 403 permission_error
///   NOT_FOUND -> 404 invalid_request_error; ALREADY_EXISTS, ABORTED -> 409 invalid_request_error
///   RESOURCE_EXHAUSTED -> 429 rate_limit_error; CANCELLED -> 499 (the client left; nobody reads it)
///   UNIMPLEMENTED -> 501 server_error; UNAVAILABLE -> 503 server_error
///   DEADLINE_EXCEEDED -> 504 timeout_error; INTERNAL, UNKNOWN, DATA_LOSS and any other -> 500 server_error
HttpError ToHttpError(const absl::Status& status);

}  // namespace specontext
