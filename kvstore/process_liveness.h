// Who is alive: an owner of a kvstore segment is identified by (pid, start time), so a pid that the
// kernel reused for an unrelated process is not mistaken for the original owner. Pids are only
// meaningful inside one pid namespace: processes sharing a segment must share it too (in
// Kubernetes: containers of one pod with shareProcessNamespace, or hostPID).
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace specontext::kvstore {

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or 0 when the
/// process does not exist, is a zombie, or /proc cannot be read.
uint64_t ProcessStartTicks(pid_t pid);

/// True when `pid` runs and (if start_ticks != 0 and /proc is readable) started at `start_ticks`.
/// Zombies (killed but not yet reaped) count as dead: they hold no locks and will never run again.
bool IsProcessAlive(pid_t pid, uint64_t start_ticks);

}  // namespace specontext::kvstore
