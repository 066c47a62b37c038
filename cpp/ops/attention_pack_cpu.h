// VNNI packing of K and V blocks for the attention forward's packed tile products (vnni_gemm in
// cpu_gemm.h: oneDNN brgemm, AMX tiles on CPUs that have them). Included by the per-ISA kernel
// files inside namespace stackwise::cpu::CPU_CAPABILITY.
//
// The micro-kernel multiplies a row-major A[m, k] by B packed as [k / 2, ldb, 2]: rows 2r and
// 2r + 1 of B interleaved element by element. For S = Q K^T the B operand is K^T, so a key block
// K_j [nk, D] becomes [D / 2, nk_pad, 2] (each key's pair of dims (2p, 2p + 1) is one 32-bit word,
// and the packing is a transpose of those words); for O += P V it is V_j [nk, Dv] itself, which
// becomes [nk_pad / 2, Dv, 2]. nk_pad rounds nk up to even; the padding key is zero in both, and
// the kernel gives it p = 0, so it adds nothing.
#pragma once

#include <cstdint>
#include <cstring>

// Inside CPU_CAPABILITY: each ISA's copy must keep its own symbols (no ODR merging).
namespace stackwise::cpu::CPU_CAPABILITY::attention_tile {

inline int64_t round_even(int64_t n) { return (n + 1) & ~int64_t(1); }

// k: nk keys of d (even) dims with row stride ld; out: [d / 2, round_even(nk), 2].
template <typename T>
void pack_keys_vnni(const T* k, int64_t ld, int64_t nk, int64_t d, T* out) {
  static_assert(sizeof(T) == 2, "VNNI packing of 16-bit types");
  const int64_t nk_pad = round_even(nk), words = d / 2;
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  // 16 keys at a time, so each store is a contiguous 64-byte run of one packed row: a key at a
  // time stored one word per packed row (a 2 KiB stride), which took a quarter as long as the
  // whole softmax at S=512 (perf).
  constexpr int64_t J = 16;
  int64_t j0 = 0;
  for (; j0 + J <= nk; j0 += J) {
    for (int64_t p = 0; p < words; ++p) {
      uint32_t* d = dst + p * nk_pad + j0;
      for (int64_t j = 0; j < J; ++j) std::memcpy(d + j, k + (j0 + j) * ld + 2 * p, 4);
    }
  }
  for (int64_t j = j0; j < nk; ++j) {
    const T* row = k + j * ld;
    for (int64_t p = 0; p < words; ++p) std::memcpy(dst + p * nk_pad + j, row + 2 * p, 4);
  }
  for (int64_t j = nk; j < nk_pad; ++j) {
    for (int64_t p = 0; p < words; ++p) dst[p * nk_pad + j] = 0;
  }
}

// v: nk rows of dv values with row stride ld; out: [round_even(nk) / 2, dv, 2].
template <typename T>
void pack_values_vnni(const T* v, int64_t ld, int64_t nk, int64_t dv, T* out) {
  static_assert(sizeof(T) == 2, "VNNI packing of 16-bit types");
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t r = 0; r < nk; r += 2) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(v + r * ld);
    const uint16_t* r1 = reinterpret_cast<const uint16_t*>(v + (r + 1) * ld);
    uint16_t* d = dst + r * dv;
    if (r + 1 < nk) {
      for (int64_t c = 0; c < dv; ++c) {
        d[2 * c] = r0[c];
        d[2 * c + 1] = r1[c];
      }
    } else {
      for (int64_t c = 0; c < dv; ++c) {
        d[2 * c] = r0[c];
        d[2 * c + 1] = 0;
      }
    }
  }
}

}  // namespace stackwise::cpu::CPU_CAPABILITY::attention_tile
