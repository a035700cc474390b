// The one absl::Status <-> grpc::Status mapping keeps every canonical code and the message (cut
// when it is too long for a status trailer), and the echo of rejected values is bounded.
#include "core/status_grpc.h"

#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/echo.h"

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

TEST(StatusGrpc, LongMessagesAreCutOnACharacterBoundary) {
  // "é" is two bytes: an odd offset of it must not be split.
  std::string message = "x";
  for (int i = 0; i < 100000; ++i) message += "\xc3\xa9";
  const grpc::Status g = ToGrpcStatus(absl::InvalidArgumentError(message));
  EXPECT_EQ(g.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LE(g.error_message().size(), 1100u);
  EXPECT_THAT(g.error_message(), ::testing::EndsWith("\xc3\xa9... (200001 bytes)"));
  const std::string short_message(1024, 'm');
  EXPECT_EQ(ToGrpcStatus(absl::InternalError(short_message)).error_message(), short_message);
}

TEST(EchoValue, QuotesEscapesAndCuts) {
  EXPECT_EQ(EchoValue("wizard"), "\"wizard\"");
  EXPECT_EQ(EchoValue(""), "\"\"");
  // Control characters and quotes are escaped, so an echo stays on one log line; UTF-8 stays.
  EXPECT_EQ(EchoValue("a\nb\"c\x01\xc3\xa9"), R"("a\nb\"c\x01)"
                                              "\xc3\xa9\"");
  const std::string huge(3 << 20, 'r');
  const std::string echoed = EchoValue(huge);
  EXPECT_EQ(echoed, "\"" + std::string(kMaxEchoBytes, 'r') + "\"... (3145728 bytes)");
  EXPECT_EQ(EchoValue(std::string(kMaxEchoBytes, 'r')),
            "\"" + std::string(kMaxEchoBytes, 'r') + "\"");
  // A cut never splits a multi-byte character.
  EXPECT_EQ(EchoValue("ab\xc3\xa9", 3), "\"ab\"... (4 bytes)");
  EXPECT_EQ(TruncateForEcho("ab\xc3\xa9", 3), "ab... (4 bytes)");
  EXPECT_EQ(TruncateForEcho("abc", 3), "abc");
}

}  // namespace
}  // namespace specontext
