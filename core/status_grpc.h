// The one place where library status codes meet gRPC status codes (Triton's practice: services are
// thin layers over libraries returning absl::Status).
//
// absl::StatusCode and grpc::StatusCode share the canonical numbering (google.rpc.Code), so the
// mapping keeps the code and the message; unknown values become UNKNOWN.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace specontext {

/// absl::Status -> grpc::Status (OK maps to grpc::Status::OK; the message is kept, cut to 1 KiB on
/// a UTF-8 boundary so that it always fits the status trailer).
grpc::Status ToGrpcStatus(const absl::Status& status);

/// grpc::Status -> absl::Status (for clients of the services).
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace specontext
