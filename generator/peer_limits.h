// Per-client limits of the generation service: who a call comes from (the peer's address without its
// port, or its certificate identity under mutual TLS) and how many of its calls may be queued or running
// at once. The engine admits queued requests round-robin by the same key (GenerationRequest::client).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <grpcpp/server_context.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace specontext::generator {

/// `ServerContext::peer()` without the port: "ipv4:10.1.2.3:5678" -> "ipv4:10.1.2.3",
/// "ipv6:[::1]:5678" -> "ipv6:[::1]", "ipv6:%5B::1%5D:5678" -> "ipv6:%5B::1%5D"; anything else (unix
/// sockets) as it is.
std::string PeerAddressWithoutPort(std::string_view peer);

/// The client a call counts against: "tls:" + the certificate identity (its SAN or CN, as gRPC reports
/// it) when the peer authenticated with a client certificate, else PeerAddressWithoutPort(peer()).
std::string ClientKeyOf(const grpc::ServerContext& context);

/// Calls in flight per client, at most `max_per_client` each (0 = no bound). Thread-safe.
class PeerLimiter {
 public:
  explicit PeerLimiter(int32_t max_per_client) : max_(max_per_client) {}

  /// Holds one of the client's slots until destroyed (or moved from).
  class Slot {
   public:
    Slot() = default;
    Slot(PeerLimiter* owner, std::string client) : owner_(owner), client_(std::move(client)) {}
    Slot(Slot&& o) noexcept : owner_(o.owner_), client_(std::move(o.client_)) { o.owner_ = nullptr; }
    Slot& operator=(Slot&&) = delete;
    ~Slot() {
      if (owner_ != nullptr) owner_->Release(client_);
    }

   private:
    PeerLimiter* owner_ = nullptr;
    std::string client_;
  };

  /// A slot for `client`, or ResourceExhausted naming the client and the flag when it holds them all.
  absl::StatusOr<Slot> Acquire(const std::string& client);
  /// Calls `client` holds now.
  int32_t InFlight(const std::string& client) const;

 private:
  void Release(const std::string& client);

  const int32_t max_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, int32_t> in_flight_ ABSL_GUARDED_BY(mu_);
};

}  // namespace specontext::generator
