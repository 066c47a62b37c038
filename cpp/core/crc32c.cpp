// CRC-32C: a slicing-by-8 table implementation (Intel's "slicing-by-8", Kounavis & Berry 2005)
// and, on x86-64 machines with SSE4.2, the crc32 instruction (8 bytes per instruction), chosen
// once at run time. Both produce identical results; the tests compare them.
// The crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so one
// dependency chain runs at a third of the possible rate (measured: 64 MiB in ~20 ms, 3.2 GB/s).
// Large spans are cut into three interleaved streams whose CRCs are joined with a precomputed
// "shift by L zero bytes" linear map (CRC is linear over GF(2): crc(c, A||B) =
// shift_|B|(crc(c, A)) ^ crc(0, B)), the approach of Intel's "Fast CRC Computation for iSCSI
// Polynomial Using CRC32 Instruction" (Gopal et al., 2011).
#include "stackwise/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define STACKWISE_CRC_X86 1
#endif

namespace stackwise::core {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i) {
    for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
  return t;
}

constexpr Tables kTables = make_tables();

uint32_t crc32c_software(uint32_t crc, const uint8_t* p, size_t n) {
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // little-endian hosts only (x86-64, aarch64)
    word ^= crc;
    crc = kTables[7][word & 0xFF] ^ kTables[6][(word >> 8) & 0xFF] ^
          kTables[5][(word >> 16) & 0xFF] ^ kTables[4][(word >> 24) & 0xFF] ^
          kTables[3][(word >> 32) & 0xFF] ^ kTables[2][(word >> 40) & 0xFF] ^
          kTables[1][(word >> 48) & 0xFF] ^ kTables[0][word >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ kTables[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#if defined(STACKWISE_CRC_X86)
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const uint8_t* p,
                                                        size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// Bytes per stream of one interleaved block: 3 x 8 KiB stays in L1, and joining the streams
// (two table-driven shifts) costs nothing next to 8 KiB of crc32 instructions.
constexpr size_t kStreamBytes = 8192;

// The linear map "append kStreamBytes zero bytes" on the raw (non-inverted) CRC register, as
// four byte-indexed tables: shift(c) = t[0][c & 255] ^ t[1][(c >> 8) & 255] ^ ...
struct ShiftTables {
  uint32_t t[4][256];
};

__attribute__((target("sse4.2"))) ShiftTables make_shift_tables() {
  static const uint8_t zeros[kStreamBytes] = {};
  uint32_t column[32];
  for (int bit = 0; bit < 32; ++bit)
    column[bit] = crc32c_sse42(uint32_t(1) << bit, zeros, kStreamBytes);
  ShiftTables s{};
  for (int k = 0; k < 4; ++k)
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t v = 0;
      for (int j = 0; j < 8; ++j)
        if (b & (1u << j)) v ^= column[8 * k + j];
      s.t[k][b] = v;
    }
  return s;
}

inline uint32_t shift_stream(const ShiftTables& s, uint32_t c) {
  return s.t[0][c & 0xFF] ^ s.t[1][(c >> 8) & 0xFF] ^ s.t[2][(c >> 16) & 0xFF] ^
         s.t[3][c >> 24];
}

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42_3way(uint32_t crc, const uint8_t* p,
                                                             size_t n) {
  static const ShiftTables shift = make_shift_tables();
  while (n >= 3 * kStreamBytes) {
    uint64_t a = crc, b = 0, c = 0;
    const uint8_t* pb = p + kStreamBytes;
    const uint8_t* pc = p + 2 * kStreamBytes;
    for (size_t i = 0; i < kStreamBytes; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, p + i, 8);
      std::memcpy(&wb, pb + i, 8);
      std::memcpy(&wc, pc + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    crc = shift_stream(shift, shift_stream(shift, uint32_t(a)) ^ uint32_t(b)) ^ uint32_t(c);
    p += 3 * kStreamBytes;
    n -= 3 * kStreamBytes;
  }
  return crc32c_sse42(crc, p, n);
}

bool have_sse42() {
  static const bool have = __builtin_cpu_supports("sse4.2");
  return have;
}
#endif

}  // namespace

// Exposed for the tests, which compare the two paths.
uint32_t crc32c_update_software(uint32_t crc, const void* data, size_t size) {
  return ~crc32c_software(~crc, static_cast<const uint8_t*>(data), size);
}

uint32_t crc32c_update(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
#if defined(STACKWISE_CRC_X86)
  if (have_sse42()) return ~crc32c_sse42_3way(~crc, p, size);
#endif
  return ~crc32c_software(~crc, p, size);
}

bool crc32c_hardware_accelerated() {
#if defined(STACKWISE_CRC_X86)
  return have_sse42();
#else
  return false;
#endif
}

}  // namespace stackwise::core
