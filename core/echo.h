// Bounded echoes of client-supplied values in status messages and log lines.
//
// A rejected value is worth quoting so the client sees what was wrong, but quoted whole it lets one
// request put megabytes into every log line and into the gRPC status trailer (where an oversized
// message costs the client the real status code). Every place that echoes a value goes through
// EchoValue, and ToGrpcStatus bounds whole messages the same way.
#pragma once

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace specontext {

/// Longest part of a value that EchoValue quotes.
inline constexpr size_t kMaxEchoBytes = 256;

/// `value` in double quotes with control characters and quotes C-escaped (UTF-8 kept), cut to its
/// first `max_bytes` bytes on a UTF-8 character boundary; a cut value is followed by
/// `... (N bytes)` so the reader knows it was cut and how long it was.
std::string EchoValue(absl::string_view value, size_t max_bytes = kMaxEchoBytes);

/// `text` cut to at most `max_bytes` bytes on a UTF-8 boundary, with `... (N bytes)` appended when
/// cut (the result may then exceed `max_bytes` by that suffix). For whole messages that may hold
/// echoed values from code that does not use EchoValue.
std::string TruncateForEcho(absl::string_view text, size_t max_bytes);

}  // namespace specontext
