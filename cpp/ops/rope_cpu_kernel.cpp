// RoPE CPU kernel: rotate_half rotation of q and k in one pass (math in stackwise/rope_math.h).
//
// Compiled once per ISA (cmake/StackwiseCpuKernels.cmake). Rows (one head at one position, D
// features) of q and k form one index space, split across threads; each row reads its input once
// (any strides over B, H, S, so a [B,S,H,D] projection viewed as [B,H,S,D] is read in place) and
// writes a contiguous output row. The table row (rotary_dim/2 floats of cos and of sin) stays in
// L1/L2. Eager rotate_half runs ~5 kernels per tensor forward (mul, slice-cat-neg, mul, add).
// bf16/fp16 are widened to float; float64 runs in double with the float32 tables widened.
// Layout: q [B,Hq,S,D], k [B,Hk,S,D] with stride(3) == 1; outputs contiguous; cos/sin [P, h].
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "norm_rope_kernels.h"
#include "stackwise/rope_math.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

// Elements per task: 32K as in SwiGLU; a [8,32,1024,128] q splits into ~1000 tasks.
constexpr int64_t kGrain = 32768;

// Where a tensor's rows are: row r = (b, h, s) of a [B, H, S, D] view with the given strides.
struct RowSource {
  const void* data;
  int64_t heads, seq, stride_b, stride_h, stride_s;
  int64_t offset(int64_t r) const {
    const int64_t s = r % seq;
    const int64_t bh = r / seq;
    return (bh / heads) * stride_b + (bh % heads) * stride_h + s * stride_s;
  }
};

template <bool Inverse>
inline void rotate_vec(const FVec& a, const FVec& b, const float* c, const float* s, FVec& oa,
                       FVec& ob) {
  const FVec cv = FVec::loadu(c);
  const FVec sv = Inverse ? FVec::loadu(s).neg() : FVec::loadu(s);
  oa = a * cv - b * sv;
  ob = at::vec::fmadd(a, sv, b * cv);
}

// One row: x -> y (both d long), pairs (i, i + h) for i < h = rotary_dim / 2.
template <typename T, bool Inverse>
void rope_row(const T* x, T* y, const float* c, const float* s, int64_t h, int64_t rotary_dim,
              int64_t d) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + FVec::size() <= h; i += FVec::size()) {
      FVec oa, ob;
      rotate_vec<Inverse>(FVec::loadu(x + i), FVec::loadu(x + h + i), c + i, s + i, oa, ob);
      oa.store(y + i);
      ob.store(y + h + i);
    }
  } else if constexpr (c10::is_reduced_floating_point_v<T>) {
    using TVec = Vectorized<T>;
    for (; i + TVec::size() <= h; i += TVec::size()) {
      auto [a0, a1] = at::vec::convert_to_float<T>(TVec::loadu(x + i));
      auto [b0, b1] = at::vec::convert_to_float<T>(TVec::loadu(x + h + i));
      FVec oa0, ob0, oa1, ob1;
      rotate_vec<Inverse>(a0, b0, c + i, s + i, oa0, ob0);
      rotate_vec<Inverse>(a1, b1, c + i + FVec::size(), s + i + FVec::size(), oa1, ob1);
      at::vec::convert_from_float<T>(oa0, oa1).store(y + i);
      at::vec::convert_from_float<T>(ob0, ob1).store(y + h + i);
    }
    // Half a vector (rotary_dim/2 = 16 with AVX-512, the usual MLA decoupled key width of 32).
    constexpr int64_t kHalf = FVec::size();
    for (; i + kHalf <= h; i += kHalf) {
      auto a = std::get<0>(at::vec::convert_to_float<T>(TVec::loadu(x + i, kHalf)));
      auto b = std::get<0>(at::vec::convert_to_float<T>(TVec::loadu(x + h + i, kHalf)));
      FVec oa, ob;
      rotate_vec<Inverse>(a, b, c + i, s + i, oa, ob);
      at::vec::convert_from_float<T>(oa, oa).store(y + i, kHalf);
      at::vec::convert_from_float<T>(ob, ob).store(y + h + i, kHalf);
    }
  }
  for (; i < h; ++i) {
    const acc_t si = Inverse ? -acc_t(s[i]) : acc_t(s[i]);
    acc_t oa, ob;
    math::rope_rotate_pair<acc_t>(acc_t(x[i]), acc_t(x[h + i]), acc_t(c[i]), si, oa, ob);
    y[i] = static_cast<T>(oa);
    y[h + i] = static_cast<T>(ob);
  }
  if (rotary_dim < d) std::memcpy(y + rotary_dim, x + rotary_dim, (d - rotary_dim) * sizeof(T));
}

RowSource row_source(const at::Tensor& t) {
  return {t.const_data_ptr(), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T, bool Inverse>
void rope_all(const at::Tensor& q, const at::Tensor& k, const float* cos, const float* sin,
              int64_t rotary_dim, int64_t position_offset, at::Tensor& out_q, at::Tensor& out_k) {
  const int64_t d = q.size(3);
  const int64_t h = rotary_dim / 2;
  const int64_t seq = q.size(2);
  const int64_t q_rows = q.numel() / d;
  const int64_t rows = q_rows + k.numel() / d;
  const RowSource qs = row_source(q), ks = row_source(k);
  T* qo = out_q.mutable_data_ptr<T>();
  T* ko = out_k.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool is_q = r < q_rows;
      const RowSource& src = is_q ? qs : ks;
      const int64_t rr = is_q ? r : r - q_rows;
      const T* x = static_cast<const T*>(src.data) + src.offset(rr);
      T* y = (is_q ? qo : ko) + rr * d;
      const int64_t pos = position_offset + rr % seq;
      rope_row<T, Inverse>(x, y, cos + pos * h, sin + pos * h, h, rotary_dim, d);
    }
  });
}

}  // namespace

void rope_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin, int64_t rotary_dim, int64_t position_offset, bool inverse,
                 at::Tensor& out_q, at::Tensor& out_k) {
  const float* c = cos.const_data_ptr<float>();
  const float* s = sin.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
    if (inverse) {
      rope_all<scalar_t, true>(q, k, c, s, rotary_dim, position_offset, out_q, out_k);
    } else {
      rope_all<scalar_t, false>(q, k, c, s, rotary_dim, position_offset, out_q, out_k);
    }
  });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
