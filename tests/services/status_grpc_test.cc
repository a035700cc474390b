// The one absl::Status <-> grpc::Status mapping keeps every canonical code and the message.
#include "core/status_grpc.h"

#include <random>

#include <gtest/gtest.h>

namespace specontext {
namespace {

TEST(StatusGrpc, EveryCanonicalCodeRoundTrips) {
  std::mt19937 rng(std::random_device{}());
  for (int code = 1; code <= 16; ++code) {
    const std::string message = "failure " + std::to_string(rng());
    const absl::Status s(static_cast<absl::StatusCode>(code), message);
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(g.error_message(), message);
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("x")).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // Values outside google.rpc.Code become UNKNOWN rather than an invalid enum.
  EXPECT_EQ(ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(40), "odd")).error_code(),
            grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(99), "odd")).code(),
            absl::StatusCode::kUnknown);
}

}  // namespace
}  // namespace specontext
