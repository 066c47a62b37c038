// Vectorized row loops shared by the attention CPU kernels (forward and backward). Included by
// the per-ISA kernel files inside namespace stackwise::cpu::CPU_CAPABILITY, so Vectorized<T> has
// the width of the ISA being compiled. acc_t is float (double for float64 tensors).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <type_traits>

#include "stackwise/attention_math.h"

// Inside CPU_CAPABILITY: each ISA's copy must keep its own symbols (no ODR merging).
namespace stackwise::cpu::CPU_CAPABILITY::attention_tile {

using at::vec::Vectorized;

// Strided view of one [rows, D] matrix of a [B, H, S, D] tensor (unit stride on D).
template <typename T>
struct HeadView {
  T* base;
  int64_t sb, sh, ss;
  T* row(int64_t b, int64_t h, int64_t s) const { return base + b * sb + h * sh + s * ss; }
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t) {
  // With a single row the row stride is arbitrary (size-1 dims keep any stride); BLAS still
  // wants ld >= D, and no second row is ever addressed.
  const int64_t ss = t.size(2) == 1 ? t.size(3) : t.stride(2);
  return {const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1), ss};
}

// row[c] += bias[c] (0 or -inf) over n columns.
template <typename acc_t>
inline void add_bias(acc_t* row, const acc_t* bias, int64_t n) {
  at::vec::map2([](const Vectorized<acc_t>& x, const Vectorized<acc_t>& b) { return x + b; }, row, row, bias,
                n);
}

// Masks the keys a query may not see under the causal rule: columns [visible, n) of its row.
template <typename acc_t>
inline void mask_tail(acc_t* row, int64_t visible, int64_t n) {
  std::fill(row + visible, row + n, stackwise::math::neg_inf<acc_t>());
}

template <typename acc_t>
inline acc_t row_max(const acc_t* row, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec vmax(stackwise::math::neg_inf<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + c));
  acc_t m = at::vec::vec_reduce_all<acc_t>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < n; ++c) m = std::max(m, row[c]);
  return m;
}

// As row_max for the packed forward's float tiles: four independent accumulators and the plain
// max instruction, where at::vec::maximum spends four instructions on one dependency chain to
// propagate NaN (perf, bf16 S=2048 D=64: that loop was ~20% of the kernel's time outside the
// tile products). A NaN score still reaches the output: exp(NaN - m) is NaN.
inline float row_max_unrolled(const float* row, int64_t n) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = FVec::size();
  FVec m0(stackwise::math::neg_inf<float>()), m1 = m0, m2 = m0, m3 = m0;
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    m0 = at::vec::clamp_min(m0, FVec::loadu(row + c));
    m1 = at::vec::clamp_min(m1, FVec::loadu(row + c + W));
    m2 = at::vec::clamp_min(m2, FVec::loadu(row + c + 2 * W));
    m3 = at::vec::clamp_min(m3, FVec::loadu(row + c + 3 * W));
  }
  for (; c + W <= n; c += W) m0 = at::vec::clamp_min(m0, FVec::loadu(row + c));
  m0 = at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
  float m = at::vec::vec_reduce_all<float>(
      [](FVec a, FVec b) { return at::vec::clamp_min(a, b); }, m0);
  for (; c < n; ++c) m = std::max(m, row[c]);
  return m;
}

// row[c] = exp(row[c] - shift) in place; returns the sum. exp_u20 (ATen's <= 20 ulp polynomial,
// ~2e-6 relative in fp32, the full exp for double) maps -inf to 0 like exp.
template <typename acc_t>
inline acc_t exp_shift_sum(acc_t* row, acc_t shift, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift);
  // Two independent exp chains and sums per step: the polynomial's latency, not its
  // throughput, bounded the one-vector loop.
  Vec vsum(acc_t(0)), vsum1(acc_t(0));
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    const Vec e0 = (Vec::loadu(row + c) - vshift).exp_u20();
    const Vec e1 = (Vec::loadu(row + c + W) - vshift).exp_u20();
    e0.store(row + c);
    e1.store(row + c + W);
    vsum = vsum + e0;
    vsum1 = vsum1 + e1;
  }
  for (; c + W <= n; c += W) {
    const Vec e = (Vec::loadu(row + c) - vshift).exp_u20();
    e.store(row + c);
    vsum = vsum + e;
  }
  vsum = vsum + vsum1;
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    row[c] = stackwise::math::attn_exp(row[c] - shift);
    sum += row[c];
  }
  return sum;
}

// Reduced dtypes, one pass: narrow[c] = scalar_t(exp(row[c] - shift)); returns the fp32 sum of
// the unrounded values (as FlashAttention does). Saves a store and a reload of the fp32 tile.
template <typename scalar_t>
inline float exp_shift_sum_narrow(const float* row, float shift, int64_t n, scalar_t* narrow) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = 2 * FVec::size();
  const FVec vshift(shift);
  FVec vsum(0.f);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const FVec e0 = (FVec::loadu(row + c) - vshift).exp_u20();
    const FVec e1 = (FVec::loadu(row + c + FVec::size()) - vshift).exp_u20();
    vsum = vsum + e0 + e1;
    at::vec::convert_from_float<scalar_t>(e0, e1).store(narrow + c);
  }
  float sum = at::vec::vec_reduce_all<float>([](FVec a, FVec b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    const float e = stackwise::math::attn_exp(row[c] - shift);
    sum += e;
    narrow[c] = static_cast<scalar_t>(e);
  }
  return sum;
}

// As exp_shift_sum_narrow on an unscaled score row: narrow[c] = scalar_t(exp(row[c] * scale -
// shift)), one fused multiply-add per element instead of a separate scaling pass over the tile.
template <typename scalar_t>
inline float exp_scaled_sum_narrow(const float* row, float scale, float shift, int64_t n,
                                   scalar_t* narrow) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = 2 * FVec::size();
  const FVec vscale(scale), vneg_shift(-shift);
  FVec vsum(0.f);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const FVec e0 = at::vec::fmadd(FVec::loadu(row + c), vscale, vneg_shift).exp_u20();
    const FVec e1 =
        at::vec::fmadd(FVec::loadu(row + c + FVec::size()), vscale, vneg_shift).exp_u20();
    vsum = vsum + e0 + e1;
    at::vec::convert_from_float<scalar_t>(e0, e1).store(narrow + c);
  }
  float sum = at::vec::vec_reduce_all<float>([](FVec a, FVec b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    const float e = stackwise::math::attn_exp(row[c] * scale - shift);
    sum += e;
    narrow[c] = static_cast<scalar_t>(e);
  }
  return sum;
}

#if defined(CPU_CAPABILITY_AVX512)
// exp_scaled_sum_narrow for bf16 on CPUs with AVX512-BF16 (every AMX CPU has it): one
// vcvtne2ps2bf16 (round to nearest even, like c10::BFloat16) per 32 values in place of ATen's
// integer rounding sequence (about eight instructions per 16 values). The AVX512 kernel build cannot assume the extension, so this function alone
// is compiled for it and the caller checks the CPU.
__attribute__((target("avx512bf16"))) inline float exp_scaled_sum_bf16_hw(
    const float* row, float scale, float shift, int64_t n, c10::BFloat16* narrow) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = 2 * FVec::size();
  const FVec vscale(scale), vneg_shift(-shift);
  FVec vsum(0.f);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const FVec e0 = at::vec::fmadd(FVec::loadu(row + c), vscale, vneg_shift).exp_u20();
    const FVec e1 =
        at::vec::fmadd(FVec::loadu(row + c + FVec::size()), vscale, vneg_shift).exp_u20();
    vsum = vsum + e0 + e1;
    const __m512bh packed = _mm512_cvtne2ps_pbh(__m512(e1), __m512(e0));
    _mm512_storeu_si512(narrow + c, reinterpret_cast<const __m512i&>(packed));
  }
  // Lane sum through memory: gcc 12 warns about its own reduction intrinsics when inlined into
  // a function with a target attribute.
  float lanes[FVec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (float x : lanes) sum += x;
  for (; c < n; ++c) {
    const float e = stackwise::math::attn_exp(row[c] * scale - shift);
    sum += e;
    narrow[c] = static_cast<c10::BFloat16>(e);
  }
  return sum;
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

// Reduced dtypes, one pass: row[c] = exp(row[c] - lse) and narrow[c] = scalar_t(row[c]).
template <typename scalar_t>
inline void exp_shift_narrow(float* row, float lse, int64_t n, scalar_t* narrow) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = 2 * FVec::size();
  const FVec vlse(lse);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const FVec e0 = (FVec::loadu(row + c) - vlse).exp_u20();
    const FVec e1 = (FVec::loadu(row + c + FVec::size()) - vlse).exp_u20();
    e0.store(row + c);
    e1.store(row + c + FVec::size());
    at::vec::convert_from_float<scalar_t>(e0, e1).store(narrow + c);
  }
  for (; c < n; ++c) {
    row[c] = stackwise::math::prob_from_lse(row[c], lse);
    narrow[c] = static_cast<scalar_t>(row[c]);
  }
}

// Reduced dtypes, one pass: narrow[c] = scalar_t(p[c] * (dp[c] - d)).
template <typename scalar_t>
inline void score_grad_narrow(const float* p, const float* dp, float d, int64_t n,
                              scalar_t* narrow) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = 2 * FVec::size();
  const FVec vd(d);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const FVec g0 = FVec::loadu(p + c) * (FVec::loadu(dp + c) - vd);
    const FVec g1 =
        FVec::loadu(p + c + FVec::size()) * (FVec::loadu(dp + c + FVec::size()) - vd);
    at::vec::convert_from_float<scalar_t>(g0, g1).store(narrow + c);
  }
  for (; c < n; ++c) narrow[c] = static_cast<scalar_t>(stackwise::math::score_grad(p[c], dp[c], d));
}

// row[c] = exp(row[c] - lse): the backward's probabilities from the saved log-sum-exp.
template <typename acc_t>
inline void exp_shift(acc_t* row, acc_t lse, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec vlse(lse);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    (Vec::loadu(row + c) - vlse).exp_u20().store(row + c);
  }
  for (; c < n; ++c) row[c] = stackwise::math::prob_from_lse(row[c], lse);
}

// dp[c] = p[c] * (dp[c] - d): dS in place of dP.
template <typename acc_t>
inline void score_grad(const acc_t* p, acc_t* dp, acc_t d, int64_t n) {
  const Vectorized<acc_t> vd(d);
  at::vec::map2([vd](const Vectorized<acc_t>& pv, const Vectorized<acc_t>& g) { return pv * (g - vd); }, dp, p,
                dp, n);
}

template <typename acc_t>
inline void scale_row(acc_t* row, acc_t factor, int64_t n) {
  const Vectorized<acc_t> vf(factor);
  at::vec::map([vf](const Vectorized<acc_t>& x) { return x * vf; }, row, row, n);
}

// dst[c] = scalar_t(src[c] * factor).
template <typename scalar_t, typename acc_t>
inline void store_scaled(const acc_t* src, acc_t factor, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Vectorized<acc_t> vf(factor);
    at::vec::map([vf](const Vectorized<acc_t>& x) { return x * vf; }, dst, src, n);
  } else if constexpr (std::is_same_v<acc_t, float>) {
    using FVec = Vectorized<float>;
    constexpr int64_t W = 2 * FVec::size();
    const FVec vf(factor);
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      at::vec::convert_from_float<scalar_t>(FVec::loadu(src + c) * vf,
                                            FVec::loadu(src + c + FVec::size()) * vf)
          .store(dst + c);
    }
    for (; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c] * factor);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c] * factor);
  }
}

}  // namespace stackwise::cpu::CPU_CAPABILITY::attention_tile
