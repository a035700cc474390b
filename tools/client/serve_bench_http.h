// The HTTP side of the serving benchmark (specontext-loadgen --api http): the same planned requests
// sent to the generator's OpenAI-compatible API as POST /v1/completions with "stream": true, timed
// from the server-sent events as RunLoad times gRPC streams (serve_bench_runner.h).
//
// Each completion chunk with text counts as one token arriving when it arrives; the final usage
// chunk ("stream_options": {"include_usage": true}) gives the exact output count, and tokens it
// counts beyond the text chunks (a token whose text the server held back to complete a UTF-8
// character, or that decodes to nothing) count as arriving with the last chunk (gaps of 0), as
// several tokens in one gRPC message do. A request fails with HTTP_<status> on a non-200 answer or
// an error event, UNAVAILABLE when the connection fails, DEADLINE_EXCEEDED past --timeout-s; the
// first UNAVAILABLE or DEADLINE_EXCEEDED stops the sending, as on gRPC.
//
// One client thread per request in flight (cpp-httplib's client is blocking), each on its own
// connection (TCP setup counts in its TTFT; the send time is when it is handed to its thread): a
// closed loop runs `concurrency` threads at a time, an open loop at most `max_concurrency` (or as
// many as it has in flight).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"

#include "tools/client/serve_bench_runner.h"

namespace specontext::client {

struct HttpTarget {
  std::string host;
  int port = 0;
  std::string tls_ca_path;  // PEM roots: HTTPS when set
  std::string tls_cert_path, tls_key_path;  // client certificate (mutual TLS)
};

/// Parses HOST:PORT (or [V6]:PORT).
absl::StatusOr<HttpTarget> ParseHttpAddress(const std::string& addr);

/// The /v1/completions body of `r`: prompt as token ids (or text), max_tokens, ignore_eos,
/// temperature, seed, budget/dense, "stream": true with usage.
nlohmann::json CompletionBody(const v1::GenerateRequest& r);

/// GET /v1/models with a 10 s timeout: OK when the API answers 200, else UNAVAILABLE saying why.
absl::Status CheckHttpApi(const HttpTarget& target);

/// RunLoad over HTTP: sends `requests` (as CompletionBody) to `target` as `options` says.
LoadResult RunLoadHttp(const HttpTarget& target, const std::vector<v1::GenerateRequest>& requests,
                       const LoadOptions& options);

}  // namespace specontext::client
