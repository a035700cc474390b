#include "generator/peer_limits.h"

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/echo.h"

namespace specontext::generator {

std::string PeerAddressWithoutPort(std::string_view peer) {
  if (!peer.starts_with("ipv4:") && !peer.starts_with("ipv6:")) return std::string(peer);
  const size_t colon = peer.rfind(':');
  // The scheme's colon only (no port): keep it as it is.
  if (colon == std::string_view::npos || colon < 5) return std::string(peer);
  const std::string_view port = peer.substr(colon + 1);
  if (port.empty() || port.find_first_not_of("0123456789") != std::string_view::npos) return std::string(peer);
  // An IPv6 address without brackets has colons of its own: only a bracketed one ends before ":port".
  const std::string_view host = peer.substr(0, colon);
  if (peer.starts_with("ipv6:") && !host.ends_with("]") && !host.ends_with("%5D")) return std::string(peer);
  return std::string(host);
}

std::string ClientKeyOf(const grpc::ServerContext& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    std::vector<std::string> names;
    for (const grpc::string_ref& id : auth->GetPeerIdentity()) names.emplace_back(id.data(), id.size());
    if (!names.empty()) return absl::StrCat("tls:", absl::StrJoin(names, ","));
  }
  return PeerAddressWithoutPort(context.peer());
}

absl::StatusOr<PeerLimiter::Slot> PeerLimiter::Acquire(const std::string& client) {
  {
    absl::MutexLock lock(&mu_);
    int32_t& n = in_flight_[client];
    if (max_ > 0 && n >= max_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "client ", EchoValue(client), " already has ", n,
          " requests queued or running, the per-client limit (--max-requests-per-peer); retry when one finishes"));
    }
    ++n;
  }
  return Slot(this, client);
}

int32_t PeerLimiter::InFlight(const std::string& client) const {
  absl::MutexLock lock(&mu_);
  auto it = in_flight_.find(client);
  return it == in_flight_.end() ? 0 : it->second;
}

void PeerLimiter::Release(const std::string& client) {
  absl::MutexLock lock(&mu_);
  auto it = in_flight_.find(client);
  if (it != in_flight_.end() && --it->second <= 0) in_flight_.erase(it);
}

}  // namespace specontext::generator
