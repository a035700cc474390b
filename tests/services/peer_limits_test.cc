// The generator's per-client key and per-client call limit (generator/peer_limits.h).
#include "generator/peer_limits.h"

#include <gtest/gtest.h>

namespace specontext::generator {
namespace {

TEST(PeerAddressWithoutPort, DropsOnlyThePort) {
  EXPECT_EQ(PeerAddressWithoutPort("ipv4:10.1.2.3:5678"), "ipv4:10.1.2.3");
  EXPECT_EQ(PeerAddressWithoutPort("ipv6:[::1]:5678"), "ipv6:[::1]");
  EXPECT_EQ(PeerAddressWithoutPort("ipv6:%5B::ffff:127.0.0.1%5D:41000"), "ipv6:%5B::ffff:127.0.0.1%5D");
  EXPECT_EQ(PeerAddressWithoutPort("ipv6:::1"), "ipv6:::1");  // no brackets: no port to drop
  EXPECT_EQ(PeerAddressWithoutPort("unix:/tmp/sock"), "unix:/tmp/sock");
  EXPECT_EQ(PeerAddressWithoutPort("ipv4:10.1.2.3"), "ipv4:10.1.2.3");
  EXPECT_EQ(PeerAddressWithoutPort(""), "");
}

TEST(PeerLimiter, CapsEachClientAndFreesOnRelease) {
  PeerLimiter limiter(2);
  auto a1 = limiter.Acquire("a");
  auto a2 = limiter.Acquire("a");
  ASSERT_TRUE(a1.ok() && a2.ok());
  auto a3 = limiter.Acquire("a");
  ASSERT_EQ(a3.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(a3.status().message().find("--max-requests-per-peer"), std::string::npos) << a3.status();
  EXPECT_TRUE(limiter.Acquire("b").ok());  // another client is not affected
  EXPECT_EQ(limiter.InFlight("b"), 0);     // its slot went with the temporary
  { PeerLimiter::Slot gone = *std::move(a1); }
  EXPECT_EQ(limiter.InFlight("a"), 1);
  EXPECT_TRUE(limiter.Acquire("a").ok());
  PeerLimiter unbounded(0);
  std::vector<PeerLimiter::Slot> many;
  for (int i = 0; i < 100; ++i) many.push_back(*unbounded.Acquire("a"));
  EXPECT_EQ(unbounded.InFlight("a"), 100);
}

}  // namespace
}  // namespace specontext::generator
