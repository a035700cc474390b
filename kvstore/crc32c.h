// CRC32C (Castagnoli polynomial, reflected 0x82F63B78), used to checksum the immutable part of a
// kvstore segment header. A table-driven software version: the header is ~100 bytes and is hashed
// once per create/attach, so speed does not matter here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace specontext::kvstore {

/// CRC32C of `size` bytes at `data`, continuing from `crc` (pass 0 to start). Crc32c("123456789")
/// is 0xE3069283.
uint32_t Crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace specontext::kvstore
