// Status plumbing shared by every library of the project. Libraries return absl::Status / StatusOr
// and never throw across their boundary.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPC_CONCAT_INNER(a, b) a##b
#define SPC_CONCAT(a, b) SPC_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                         \
  do {                                                \
    ::absl::Status spc_status_ = (expr);              \
    if (!spc_status_.ok()) return spc_status_;        \
  } while (0)

#define SPC_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

// ASSIGN_OR_RETURN(auto x, MakeX());
#define ASSIGN_OR_RETURN(lhs, expr) \
  SPC_ASSIGN_OR_RETURN_IMPL(SPC_CONCAT(spc_statusor_, __LINE__), lhs, expr)
