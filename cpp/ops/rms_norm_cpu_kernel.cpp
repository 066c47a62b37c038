// RMSNorm CPU kernels, y = x * rstd * w and its backward (math in stackwise/rms_norm_math.h).
//
// Compiled once per ISA (cmake/StackwiseCpuKernels.cmake). Rows are independent: the forward
// reads a row twice (sum of squares, then scale; the second read hits L1/L2 for D <= 16K) and
// writes it once; the backward reads dy and x twice per row and writes dx, accumulating dw in a
// float buffer per chunk of rows. Eager PyTorch (LLaMA's module) runs ~7 kernels forward and ~10 backward, each a
// full pass over memory. bf16/fp16 are widened to float in registers; float64 runs in double.
// Layout: x, y, dy, dx [rows, d] contiguous; w [d] and rstd [rows] in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "norm_rope_kernels.h"
#include "stackwise/rms_norm_math.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per forward task: 32K (128 KB of fp32) amortises task dispatch (~1 us), as in SwiGLU.
constexpr int64_t kGrain = 32768;
// Backward chunks: at least 16 rows each, at most 128 chunks, so the [chunks, d] partial buffer
// of dw stays <= 1/48 of the backward's traffic and (2 MB at d = 4096) cache-friendly. The chunk
// layout depends on rows only, never on the thread count, so dw is the same run to run.
constexpr int64_t kMinRowsPerChunk = 16;
constexpr int64_t kMaxChunks = 128;

// Horizontal sum in lane order (once per row; deterministic).
template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
}

// Loads 2 * Vectorized<float>::size() elements of T as two float vectors (T reduced) or
// Vectorized<T>::size() elements of T as-is: `Pack<T>` hides the difference.
template <typename T>
struct Pack {
  using acc_t = acc_type_t<T>;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vectorized<T>::size();
  static constexpr bool kReduced = c10::is_reduced_floating_point_v<T>;

  static void load(const T* p, AVec& a0, AVec& a1) {
    if constexpr (kReduced) {
      std::tie(a0, a1) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {
      a0 = AVec::loadu(p);
      a1 = AVec::loadu(p + AVec::size());
    }
  }
  static void store(T* p, const AVec& a0, const AVec& a1) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(a0, a1).store(p);
    } else {
      a0.store(p);
      a1.store(p + AVec::size());
    }
  }
  // Elements handled per step: two accumulation-type vectors.
  static constexpr int64_t step() { return 2 * AVec::size(); }
};

template <typename T>
acc_type_t<T> row_sum_sq(const T* x, int64_t d) {
  using P = Pack<T>;
  using AVec = typename P::AVec;
  using acc_t = acc_type_t<T>;
  AVec s0(acc_t(0)), s1(acc_t(0));
  int64_t j = 0;
  for (; j + P::step() <= d; j += P::step()) {
    AVec x0, x1;
    P::load(x + j, x0, x1);
    s0 = at::vec::fmadd(x0, x0, s0);
    s1 = at::vec::fmadd(x1, x1, s1);
  }
  acc_t s = reduce_sum<acc_t>(s0 + s1);
  for (; j < d; ++j) s += acc_t(x[j]) * acc_t(x[j]);
  return s;
}

template <typename T>
void forward_rows(const T* x, const acc_type_t<T>* w, T* y, acc_type_t<T>* rstd, int64_t d,
                  acc_type_t<T> eps, int64_t begin, int64_t end) {
  using P = Pack<T>;
  using AVec = typename P::AVec;
  using acc_t = acc_type_t<T>;
  constexpr int64_t V = AVec::size();
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    const acc_t rs = math::rms_norm_rstd<acc_t>(row_sum_sq(xr, d), d, eps);
    rstd[r] = rs;
    const AVec rv(rs);
    int64_t j = 0;
    for (; j + P::step() <= d; j += P::step()) {
      AVec x0, x1;
      P::load(xr + j, x0, x1);
      P::store(yr + j, x0 * rv * AVec::loadu(w + j), x1 * rv * AVec::loadu(w + j + V));
    }
    for (; j < d; ++j) yr[j] = static_cast<T>(math::rms_norm_forward<acc_t>(xr[j], rs, w[j]));
  }
}

// One row of the backward: dx, and dw accumulated into `dw_acc` (the chunk's partial sum).
template <typename T>
void backward_row(const T* dy, const T* x, const acc_type_t<T>* w, acc_type_t<T> rs, T* dx,
                  acc_type_t<T>* dw_acc, int64_t d) {
  using P = Pack<T>;
  using AVec = typename P::AVec;
  using acc_t = acc_type_t<T>;
  constexpr int64_t V = AVec::size();
  // Pass 1: sum_k dy_k * w_k * x_k.
  AVec s0(acc_t(0)), s1(acc_t(0));
  int64_t j = 0;
  for (; j + P::step() <= d; j += P::step()) {
    AVec x0, x1, g0, g1;
    P::load(x + j, x0, x1);
    P::load(dy + j, g0, g1);
    s0 = at::vec::fmadd(g0 * AVec::loadu(w + j), x0, s0);
    s1 = at::vec::fmadd(g1 * AVec::loadu(w + j + V), x1, s1);
  }
  acc_t dot = reduce_sum<acc_t>(s0 + s1);
  for (; j < d; ++j) dot += acc_t(dy[j]) * w[j] * acc_t(x[j]);
  const acc_t coef = math::rms_norm_backward_coef<acc_t>(dot, rs, d);
  // Pass 2: dx = rs * (dy * w - x * coef); dw += dy * x * rs.
  const AVec rv(rs), cv(coef);
  j = 0;
  for (; j + P::step() <= d; j += P::step()) {
    AVec x0, x1, g0, g1;
    P::load(x + j, x0, x1);
    P::load(dy + j, g0, g1);
    const AVec w0 = AVec::loadu(w + j), w1 = AVec::loadu(w + j + V);
    P::store(dx + j, rv * (g0 * w0 - x0 * cv), rv * (g1 * w1 - x1 * cv));
    at::vec::fmadd(g0 * x0, rv, AVec::loadu(dw_acc + j)).store(dw_acc + j);
    at::vec::fmadd(g1 * x1, rv, AVec::loadu(dw_acc + j + V)).store(dw_acc + j + V);
  }
  for (; j < d; ++j) {
    const acc_t xj = x[j], gj = dy[j];
    dx[j] = static_cast<T>(math::rms_norm_backward_input<acc_t>(gj, xj, w[j], rs, coef));
    dw_acc[j] += math::rms_norm_backward_weight<acc_t>(gj, xj, rs);
  }
}

}  // namespace

void rms_norm_forward_kernel(const at::Tensor& x, const at::Tensor& weight, double eps,
                             at::Tensor& out, at::Tensor& rstd) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  const int64_t grain_rows = std::max<int64_t>(1, kGrain / d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = weight.const_data_ptr<acc_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_rows, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(xp, wp, yp, rp, d, static_cast<acc_t>(eps), begin, end);
    });
  });
}

void rms_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& rstd,
                              at::Tensor& grad_x, at::Tensor& grad_weight) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  const int64_t rows_per_chunk =
      std::max(kMinRowsPerChunk, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        using AVec = Vectorized<acc_t>;
        const scalar_t* dyp = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const acc_t* wp = weight.const_data_ptr<acc_t>();
        const acc_t* rp = rstd.const_data_ptr<acc_t>();
        scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
        acc_t* dwp = grad_weight.mutable_data_ptr<acc_t>();
        std::vector<acc_t> partial(static_cast<size_t>(chunks * d), acc_t(0));
        // At least kGrain elements per task: a parallel region for a small input costs more
        // than it saves (64x256 fp32 took ~10 ms instead of ~0.02 ms on a loaded 2-core host).
        const int64_t chunk_grain = std::max<int64_t>(1, kGrain / (rows_per_chunk * d));
        at::parallel_for(0, chunks, chunk_grain, [&](int64_t cbegin, int64_t cend) {
          for (int64_t c = cbegin; c < cend; ++c) {
            acc_t* acc = partial.data() + c * d;
            const int64_t rend = std::min(rows, (c + 1) * rows_per_chunk);
            for (int64_t r = c * rows_per_chunk; r < rend; ++r) {
              backward_row<scalar_t>(dyp + r * d, xp + r * d, wp, rp[r], dxp + r * d, acc, d);
            }
          }
        });
        // dw = sum of the chunk partials in chunk order, columns in parallel.
        const int64_t col_grain =
            std::max<int64_t>(AVec::size(), kGrain / std::max<int64_t>(chunks, 1));
        at::parallel_for(0, d, col_grain, [&](int64_t begin, int64_t end) {
          int64_t j = begin;
          for (; j + AVec::size() <= end; j += AVec::size()) {
            AVec s(acc_t(0));
            for (int64_t c = 0; c < chunks; ++c) s = s + AVec::loadu(partial.data() + c * d + j);
            s.store(dwp + j);
          }
          for (; j < end; ++j) {
            acc_t s = 0;
            for (int64_t c = 0; c < chunks; ++c) s += partial[c * d + j];
            dwp[j] = s;
          }
        });
      });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
