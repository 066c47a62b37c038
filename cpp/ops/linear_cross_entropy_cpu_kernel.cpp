// Linear cross-entropy CPU row kernel: one chunk's logits [n, V] (float32 or float64,
// contiguous) become per-token losses and, when a gradient is wanted, dloss/dlogits in place.
// Math in stackwise/linear_cross_entropy_math.h; the GEMMs around it are in
// linear_cross_entropy.cpp.
//
// Per row, three vectorized passes over V values that the GEMM just wrote: max (and the sum of
// the logits, for label smoothing), sum exp(z - max), then the gradient. Compiled once per ISA
// (cmake/StackwiseCpuKernels.cmake). float32 uses ATen's exp_u20 (<= 20 ulp, ~2.4e-6 relative,
// as the SwiGLU kernel does); float64 the full-precision exp.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "linear_cross_entropy.h"
#include "stackwise/linear_cross_entropy_math.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (int j = 0; j < Vectorized<T>::size(); ++j) s += lanes[j];
  return s;
}

template <typename T>
void process_row(T* z, int64_t vocab, int64_t label, bool ignored, T scale, bool want_grad,
                 const lce::Options& opt, T* loss_out, int64_t* pred_out) {
  using Vec = Vectorized<T>;
  const int64_t vec_end = vocab - vocab % Vec::size();
  // Pass 1: row maximum and (for label smoothing) the row sum.
  Vec vmax(-std::numeric_limits<T>::infinity());
  Vec vsum(T(0));
  for (int64_t i = 0; i < vec_end; i += Vec::size()) {
    const Vec x = Vec::loadu(z + i);
    vmax = at::vec::maximum(vmax, x);
    vsum = vsum + x;
  }
  // Horizontal reductions through memory (vec_reduce_all with maximum trips gcc 12's
  // -Wuninitialized inside the AVX-512 intrinsics headers).
  T lanes[Vec::size()];
  vmax.store(lanes);
  T mx = lanes[0];
  for (int j = 1; j < Vec::size(); ++j) mx = std::max(mx, lanes[j]);
  T sum_z = hsum(vsum);
  for (int64_t i = vec_end; i < vocab; ++i) {
    mx = std::max(mx, z[i]);
    sum_z += z[i];
  }
  if (pred_out != nullptr) {
    int64_t arg = 0;
    while (arg < vocab && !(z[arg] == mx)) ++arg;
    *pred_out = arg < vocab ? arg : 0;  // a row of NaN has no maximum: index 0
  }
  // Pass 2: sum exp(z - max), the online state's sum for a fixed max.
  const Vec vmx(mx);
  Vec vexp_sum(T(0));
  for (int64_t i = 0; i < vec_end; i += Vec::size()) {
    vexp_sum = vexp_sum + vexp(Vec::loadu(z + i) - vmx);
  }
  math::LseState<T> st{mx, hsum(vexp_sum)};
  for (int64_t i = vec_end; i < vocab; ++i) st.sum += std::exp(z[i] - mx);
  const T lse = math::lse_value(st);
  const T eps = static_cast<T>(opt.label_smoothing);
  const T lam = static_cast<T>(opt.z_loss);
  *loss_out = ignored ? T(0) : math::lce_token_loss<T>(lse, z[label], sum_z, vocab, eps, lam);
  if (!want_grad) return;
  if (ignored || scale == T(0)) {
    std::fill(z, z + vocab, T(0));
    return;
  }
  // Pass 3: g = exp(z - lse) * prob_coef - uniform, then the label's own term.
  const math::LceGradCoefs<T> c = math::lce_grad_coefs<T>(lse, vocab, eps, lam, scale);
  const Vec vlse(lse), vprob(c.prob_coef), vuni(c.uniform);
  for (int64_t i = 0; i < vec_end; i += Vec::size()) {
    (vexp(Vec::loadu(z + i) - vlse) * vprob - vuni).store(z + i);
  }
  for (int64_t i = vec_end; i < vocab; ++i) z[i] = math::lce_logit_grad<T>(z[i], lse, false, c);
  z[label] -= c.label_coef;
}

template <typename T>
void rows_impl(at::Tensor& logits, const at::Tensor& labels, at::Tensor& losses,
               at::Tensor& predictions, const at::Tensor& row_scale, const lce::Options& opt) {
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  T* z = logits.mutable_data_ptr<T>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  T* loss = losses.mutable_data_ptr<T>();
  int64_t* pred = predictions.defined() ? predictions.mutable_data_ptr<int64_t>() : nullptr;
  const bool want_grad = row_scale.defined();
  const T* scale = want_grad ? row_scale.const_data_ptr<T>() : nullptr;
  const int64_t scale_stride = want_grad ? row_scale.stride(0) : 0;
  // One row is V values (>= ~1 us of work at V = 259): a grain of 1 row for large
  // vocabularies, more rows per task for small ones.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool ignored = y[r] == opt.ignore_index;
      const T s = want_grad ? scale[r * scale_stride] : T(0);
      process_row<T>(z + r * vocab, vocab, ignored ? 0 : y[r], ignored, s, want_grad, opt,
                     loss + r, pred != nullptr ? pred + r : nullptr);
    }
  });
}

}  // namespace

void lce_rows_kernel(at::Tensor& logits, const at::Tensor& labels, at::Tensor& losses,
                     at::Tensor& predictions, const at::Tensor& row_scale,
                     const lce::Options& opt) {
  if (logits.scalar_type() == at::kDouble) {
    rows_impl<double>(logits, labels, losses, predictions, row_scale, opt);
  } else {
    rows_impl<float>(logits, labels, losses, predictions, row_scale, opt);
  }
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
