// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), the checksum of the
// activation-cache spill files and checkpoints. Torch-free.
// Standard check value: crc32c("123456789") == 0xE3069283 (RFC 3720, appendix B.4).
#pragma once

#include <cstddef>
#include <cstdint>

namespace stackwise::core {

// Extends `crc` (the value returned for the bytes before `data`; 0 to start) over `size` bytes.
// crc32c_update(crc32c_update(0, a), b) == crc32c(a ++ b).
uint32_t crc32c_update(uint32_t crc, const void* data, size_t size);

inline uint32_t crc32c(const void* data, size_t size) { return crc32c_update(0, data, size); }

// The portable table path alone (what runs where SSE4.2 is missing), for tests.
uint32_t crc32c_update_software(uint32_t crc, const void* data, size_t size);

// True when the SSE4.2 crc32 instruction path is in use on this machine.
bool crc32c_hardware_accelerated();

}  // namespace stackwise::core
