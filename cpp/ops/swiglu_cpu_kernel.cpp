// SwiGLU CPU kernels, y = silu(g) * u and its backward (math in stackwise/swiglu_math.h).
//
// Compiled once per ISA (DEFAULT, AVX2, AVX512; cmake/StackwiseCpuKernels.cmake), so
// at::vec::Vectorized is 16 floats wide on AVX-512 machines. One pass over memory: the forward
// reads g, u and writes y; the backward reads dy, g, u and writes dg, du, recomputing sigmoid(g)
// instead of saving it (eager PyTorch runs 2 kernels forward and 5 backward, each a full pass).
// bf16/fp16 are widened to float in registers; float64 runs in double.
// Layout: flat contiguous buffers of n elements.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "stackwise/swiglu_math.h"
#include "swiglu_kernels.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per parallel task: 32K fp32 elements is 128 KB per operand, large enough to amortise
// task dispatch (~1 us) against ~10 us of work, and an 8192x4096 tensor still splits into 1024.
constexpr int64_t kGrain = 32768;

template <typename T>
inline Vectorized<T> vsigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  // exp_u20 (ATen's polynomial exp, <= 20 ulp, ~2.4e-6 relative in fp32) instead of Sleef's 1-ulp
  // exp: the forward runs ~1.5x faster in cache and the error stays far inside the fp32 test
  // tolerance (1e-5). For double it is the full-precision exp.
  return one / (one + x.neg().exp_u20());
}

template <typename T>
inline Vectorized<T> vswiglu(const Vectorized<T>& g, const Vectorized<T>& u) {
  return g * vsigmoid(g) * u;
}

template <typename T>
inline void vswiglu_backward(const Vectorized<T>& g, const Vectorized<T>& u,
                             const Vectorized<T>& dy, Vectorized<T>& dg, Vectorized<T>& du) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> s = vsigmoid(g);
  const Vectorized<T> dy_s = dy * s;
  du = dy_s * g;
  dg = dy_s * u * (one + g * (one - s));
}

// float / double: compute in the tensor's own type.
template <typename T>
void forward_range(const T* g, const T* u, T* y, int64_t begin, int64_t end) {
  using Vec = Vectorized<T>;
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    vswiglu(Vec::loadu(g + i), Vec::loadu(u + i)).store(y + i);
  }
  for (; i < end; ++i) y[i] = math::swiglu_forward<T>(g[i], u[i]);
}

template <typename T>
void backward_range(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t begin,
                    int64_t end) {
  using Vec = Vectorized<T>;
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    Vec dgv, duv;
    vswiglu_backward(Vec::loadu(g + i), Vec::loadu(u + i), Vec::loadu(dy + i), dgv, duv);
    dgv.store(dg + i);
    duv.store(du + i);
  }
  for (; i < end; ++i) math::swiglu_backward<T>(g[i], u[i], dy[i], dg[i], du[i]);
}

// bfloat16 / float16: widen to two float vectors, compute, narrow once.
template <typename T>
void forward_range_reduced(const T* g, const T* u, T* y, int64_t begin, int64_t end) {
  using Vec = Vectorized<T>;
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    auto [g0, g1] = at::vec::convert_to_float<T>(Vec::loadu(g + i));
    auto [u0, u1] = at::vec::convert_to_float<T>(Vec::loadu(u + i));
    at::vec::convert_from_float<T>(vswiglu(g0, u0), vswiglu(g1, u1)).store(y + i);
  }
  for (; i < end; ++i) {
    y[i] = static_cast<T>(math::swiglu_forward<float>(float(g[i]), float(u[i])));
  }
}

template <typename T>
void backward_range_reduced(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t begin,
                            int64_t end) {
  using Vec = Vectorized<T>;
  using FVec = Vectorized<float>;
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    auto [g0, g1] = at::vec::convert_to_float<T>(Vec::loadu(g + i));
    auto [u0, u1] = at::vec::convert_to_float<T>(Vec::loadu(u + i));
    auto [d0, d1] = at::vec::convert_to_float<T>(Vec::loadu(dy + i));
    FVec dg0, dg1, du0, du1;
    vswiglu_backward(g0, u0, d0, dg0, du0);
    vswiglu_backward(g1, u1, d1, dg1, du1);
    at::vec::convert_from_float<T>(dg0, dg1).store(dg + i);
    at::vec::convert_from_float<T>(du0, du1).store(du + i);
  }
  for (; i < end; ++i) {
    float dgf, duf;
    math::swiglu_backward<float>(float(g[i]), float(u[i]), float(dy[i]), dgf, duf);
    dg[i] = static_cast<T>(dgf);
    du[i] = static_cast<T>(duf);
  }
}

}  // namespace

void swiglu_forward_kernel(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_cpu", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
        forward_range_reduced(g, u, y, begin, end);
      } else {
        forward_range(g, u, y, begin, end);
      }
    });
  });
}

void swiglu_backward_kernel(const at::Tensor& grad_out, const at::Tensor& gate,
                            const at::Tensor& up, at::Tensor& grad_gate, at::Tensor& grad_up) {
  const int64_t n = gate.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward_cpu", [&] {
        const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* g = gate.const_data_ptr<scalar_t>();
        const scalar_t* u = up.const_data_ptr<scalar_t>();
        scalar_t* dg = grad_gate.mutable_data_ptr<scalar_t>();
        scalar_t* du = grad_up.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
            backward_range_reduced(dy, g, u, dg, du, begin, end);
          } else {
            backward_range(dy, g, u, dg, du, begin, end);
          }
        });
      });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
