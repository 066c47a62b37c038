// Storage formats of stackwise's quantized tensors, shared by the CPU and CUDA kernels so both
// produce the same bits.
//
// NF4 (Dettmers et al. 2023, "QLoRA", section 3; the code book bitsandbytes ships):
//   - x is split into blocks of `block_size` consecutive elements (power of two, 32..4096);
//     absmax[b] = max |x| over block b (float32, stored).
//   - s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1), computed in float32: the reciprocal is
//     rounded first, then multiplied, exactly as bitsandbytes does.
//   - code = number of midpoints m_i (between consecutive code-book values, rounded to float32)
//     with m_i < s: the nearest code, a tie going to the lower code.
//   - two codes per byte, the first element in the high nibble.
//   - dequantized value = NF4_CODE[code] * absmax[b] in float32, then cast.
// int8: symmetric absmax; scale = absmax / 127 per row (or block); q = round-half-even(x / scale)
//   clamped to [-127, 127]; an all-zero row has scale 0 and codes 0. value = q * scale.
// fp8: e4m3 (finite max 448) or e5m2 (finite max 57344); scale = absmax / max per row (or
//   tensor); q = fp8(clamp(x / scale, -max, max)) with round-to-nearest-even; value = q * scale.
#pragma once

#include <cstdint>
#include <limits>

#include "stackwise/macros.h"

namespace stackwise::quant {

// The NF4 code book, float32 (values as published with QLoRA / bitsandbytes).
#define STACKWISE_NF4_CODE_VALUES                                                              \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                  \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                 \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,    \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

// Smallest absmax used as a divisor, so an all-zero block maps to code 7 (0.0) without NaN.
constexpr float kNf4MinAbsmax = 1e-38f;
constexpr int kNf4MinBlock = 32;
constexpr int kNf4MaxBlock = 4096;
constexpr float kInt8Max = 127.0f;
constexpr float kFp8E4m3Max = 448.0f;
constexpr float kFp8E5m2Max = 57344.0f;

// Midpoint i (between code i and i + 1), rounded to float32 as (a + b) / 2 in float32.
STACKWISE_HOST_DEVICE float nf4_midpoint(const float* code, int i) {
  return (code[i] + code[i + 1]) / 2.0f;
}

// The NF4 code of s in [-1, 1]: how many midpoints lie strictly below s.
STACKWISE_HOST_DEVICE uint8_t nf4_encode(float s, const float* midpoints) {
  uint8_t q = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) q += (midpoints[i] < s) ? 1 : 0;
  return q;
}

// Scale factor applied to a block: the float32 reciprocal of the clamped absmax.
STACKWISE_HOST_DEVICE float nf4_inv_scale(float absmax) {
  return 1.0f / (absmax > kNf4MinAbsmax ? absmax : kNf4MinAbsmax);
}

// One step of an absmax reduction that keeps a NaN: a block (NF4) or row (int8, fp8) holding
// NaN or +-inf gets a NaN scale, so every value dequantized from it is NaN (never a plausible
// finite number). Also combines two partial absmax values.
STACKWISE_HOST_DEVICE float absmax_step(float am, float v) {
  const float a = v < 0.0f ? -v : v;
  return (a > am || a != a) ? a : am;
}

// The absmax a scale is made from: NaN when the reduction met a non-finite value.
STACKWISE_HOST_DEVICE float finite_absmax_or_nan(float am) {
  return am <= std::numeric_limits<float>::max() ? am : std::numeric_limits<float>::quiet_NaN();
}

STACKWISE_HOST_DEVICE float clamp_unit(float s) {
  return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

STACKWISE_HOST_DEVICE uint8_t pack_nibbles(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first << 4) | (second & 0xF));
}

STACKWISE_HOST_DEVICE bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// int8: the code of x given the row scale (0 for an all-zero row).
STACKWISE_HOST_DEVICE int8_t int8_encode(float x, float scale) {
  if (!(scale > 0.0f)) return 0;
  float r = x / scale;
#if defined(__CUDA_ARCH__)
  r = rintf(r);
#else
  r = __builtin_rintf(r);
#endif
  r = r < -kInt8Max ? -kInt8Max : (r > kInt8Max ? kInt8Max : r);
  return static_cast<int8_t>(r);
}

}  // namespace stackwise::quant
