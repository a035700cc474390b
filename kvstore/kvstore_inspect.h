// Human and JSON renderings of a kvstore Snapshot (used by `specontext-kvstore inspect`).
#pragma once

#include <string>

#include "kvstore/kv_store.h"

namespace specontext::kvstore {

/// Multi-line report: header fields, usage, owners (with liveness and heartbeat age), sequences.
std::string FormatSnapshotText(const std::string& name, const Snapshot& snap);

/// The same as a JSON object:
/// {"name","header":{...},"usage":{...},"owners":[...],"sequences":[...]}.
std::string FormatSnapshotJson(const std::string& name, const Snapshot& snap);

}  // namespace specontext::kvstore
