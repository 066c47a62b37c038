// Linear attention CPU kernels (Katharopoulos et al. 2020; math in
// stackwise/linear_attention_math.h), forward and backward, O(S*M*Dv) time and O(M*Dv) state.
//
// Layout: contiguous [B,H,S,M] features and [B,H,S,Dv] values; one (b,h) slice is a row-major
// [S,M] / [S,Dv] matrix. Work is split over B*H with at::parallel_for; inside a slice S is cut
// into chunks of kChunk rows and every product is a BLAS GEMM on tiles
// (cpu_gemm.h: the BLAS libtorch links, single-threaded inside the parallel region):
//   values are widened to v' = [v, 1] (width Dv+1), so one product gives numerator and
//   normaliser together and the state is KV' = sum k^T v' [M, Dv+1] (its last column is sum k).
//   non-causal: KV' over all chunks, then out'_c = q_c KV'.
//   causal:     out'_c = q_c KV'_<c + tril(q_c k_c^T) v'_c, then KV' += k_c^T v'_c.
// The backward recomputes num and den with the forward's schedule (so bf16/fp16 gradients see the
// float32 output, not the rounded one, and nothing but the inputs is saved), forms
// G' = [g/den, -(g.num)/den^2] for the whole slice ([S, Dv+1] acc buffer per task) and runs the
// same scheme on it: dq forward over the chunks with KV' (prefix), dk and dv backward with
// QG = sum q^T G' [M, Dv+1] (suffix):
//   dq_c = G'_c KV'_<c^T + tril(G'_c v'_c^T) k_c
//   dk_c = v'_c QG_>c^T  + tril(G'_c v'_c^T)^T q_c
//   dv_c = k_c QG_>c[:, :Dv] + tril(q_c k_c^T)^T G'_c[:, :Dv]
// Tiles are converted to the accumulation type (float for bf16/fp16/fp32, double for fp64) once
// per chunk, so bf16/fp16 accumulate in float; fp32/fp64 features are used in place.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_gemm.h"
#include "linear_attention_kernels.h"
#include "stackwise/linear_attention_math.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Rows per chunk. 64 keeps the masked C x C tile (16 KB fp32) and the chunk tiles in L1/L2 next to
// the [M, Dv+1] state for M = Dv = 64 while each GEMM is still large enough for BLAS. Measured
// (S = 4096, B = 1, H = 8, M = Dv = 64, fp32, one thread, shared 2-core Xeon, medians of 9,
// two runs each) for C = 32 / 64 / 128: causal forward 15-17 / 9-10 / 25-26 ms, causal fwd+bwd
// 68-71 / 44-49 / 98-109 ms, non-causal fwd+bwd 48-57 / 24-25 / 48-54 ms.
constexpr int64_t kChunk = 64;

// Row-major C[m,n] = op(A)[m,k] op(B)[k,n] + beta C (cpu_gemm.h: BLAS, or at::mm on tile views
// where libtorch exports no BLAS or STACKWISE_DIRECT_BLAS=0).
template <typename acc_t>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const acc_t* a,
             int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  gemm_row_major<acc_t>(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

// Zero the strictly upper triangle of a rows x rows tile (keeps t <= s).
template <typename acc_t>
void mask_upper(acc_t* a, int64_t rows, int64_t ld) {
  for (int64_t i = 0; i + 1 < rows; ++i) std::fill(a + i * ld + i + 1, a + i * ld + rows, acc_t(0));
}

// dst[0:n] = acc_t(src[0:n]).
template <typename scalar_t, typename acc_t>
void load_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t fw = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fw);
    }
    for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

// dst[0:n] = scalar_t(src[0:n] * scale).
template <typename scalar_t, typename acc_t>
void store_scaled(const acc_t* src, acc_t scale, scalar_t* dst, int64_t n) {
  using AVec = Vectorized<acc_t>;
  const AVec s(scale);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + AVec::size() <= n; i += AVec::size()) (AVec::loadu(src + i) * s).store(dst + i);
  } else {
    constexpr int64_t fw = AVec::size();
    for (; i + 2 * fw <= n; i += 2 * fw) {
      at::vec::convert_from_float<scalar_t>(AVec::loadu(src + i) * s, AVec::loadu(src + i + fw) * s)
          .store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * scale);
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using AVec = Vectorized<acc_t>;
  AVec acc(acc_t(0));
  int64_t i = 0;
  for (; i + AVec::size() <= n; i += AVec::size()) {
    acc = at::vec::fmadd(AVec::loadu(a + i), AVec::loadu(b + i), acc);
  }
  acc_t lanes[AVec::size()];
  acc.store(lanes);
  acc_t total = acc_t(0);
  for (int64_t l = 0; l < AVec::size(); ++l) total += lanes[l];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// One (b,h) slice's tiles and states, allocated once per parallel task.
template <typename scalar_t, typename acc_t>
struct Slice {
  int64_t S, M, Dv, Dv1;
  std::vector<acc_t> qbuf, kbuf, vb, ob, tile_a, tile_d, kv, qg, dqb, dkb, dvb, gall;

  // with_grads: also the backward's tiles and the slice's G' ([S, Dv+1]).
  Slice(int64_t S_, int64_t M_, int64_t Dv_, bool with_grads)
      : S(S_), M(M_), Dv(Dv_), Dv1(Dv_ + 1),
        qbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk * M), kbuf(qbuf.size()),
        vb(kChunk * Dv1), ob(kChunk * Dv1), tile_a(kChunk * kChunk), kv(M * Dv1) {
    if (with_grads) {
      tile_d.resize(kChunk * kChunk);
      qg.resize(M * Dv1);
      dqb.resize(kChunk * M);
      dkb.resize(kChunk * M);
      dvb.resize(kChunk * Dv);
      gall.resize(S * Dv1);
    }
  }

  // Features of rows [c0, c0+cn) as an acc_t tile of leading dimension M.
  const acc_t* features(const scalar_t* x, int64_t c0, int64_t cn, std::vector<acc_t>& buf) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return x + c0 * M;
    } else {
      load_acc(x + c0 * M, buf.data(), cn * M);
      return buf.data();
    }
  }

  // v' = [v, 1] of rows [c0, c0+cn) into vb (leading dimension Dv+1).
  void load_values(const scalar_t* v, int64_t c0, int64_t cn) {
    for (int64_t i = 0; i < cn; ++i) {
      load_acc(v + (c0 + i) * Dv, vb.data() + i * Dv1, Dv);
      vb[i * Dv1 + Dv] = acc_t(1);
    }
  }

  // G' = [g/den, -(g.num)/den^2] of rows [c0, c0+cn) into gall, from the unnormalised
  // out' = [num, q.z] rows in ob.
  void make_grads(const scalar_t* g, acc_t eps, int64_t c0, int64_t cn) {
    for (int64_t i = 0; i < cn; ++i) {
      acc_t* gi = gall.data() + (c0 + i) * Dv1;
      const acc_t* oi = ob.data() + i * Dv1;
      load_acc(g + (c0 + i) * Dv, gi, Dv);
      const acc_t d = math::linear_attention_den(oi[Dv], eps);
      const acc_t g_dot_num = dot(gi, oi, Dv);
      const acc_t inv = acc_t(1) / d;
      for (int64_t j = 0; j < Dv; ++j) gi[j] *= inv;
      gi[Dv] = math::linear_attention_grad_den(g_dot_num, d);
    }
  }

  // ob = out' of rows [c0, c0+cn) = q_c KV' (+ tril(q_c k_c^T) v'_c when causal); for causal,
  // KV' is the prefix state and advances past the chunk. Leaves v'_c in vb.
  void numerator_chunk(const acc_t* qc, const acc_t* kc, const scalar_t* v, bool causal,
                       int64_t c0, int64_t cn) {
    gemm_rm<acc_t>(false, false, cn, Dv1, M, qc, M, kv.data(), Dv1, 0, ob.data(), Dv1);
    if (causal) {
      load_values(v, c0, cn);
      gemm_rm<acc_t>(false, true, cn, cn, M, qc, M, kc, M, 0, tile_a.data(), kChunk);
      mask_upper(tile_a.data(), cn, kChunk);
      gemm_rm<acc_t>(false, false, cn, Dv1, cn, tile_a.data(), kChunk, vb.data(), Dv1, 1,
                     ob.data(), Dv1);
    }
  }

  // KV' = sum over all chunks of k^T v' (the non-causal state).
  void total_state(const scalar_t* k, const scalar_t* v) {
    std::fill(kv.begin(), kv.end(), acc_t(0));
    for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, S - c0);
      const acc_t* kc = features(k, c0, cn, kbuf);
      load_values(v, c0, cn);
      gemm_rm<acc_t>(true, false, M, Dv1, cn, kc, M, vb.data(), Dv1, 1, kv.data(), Dv1);
    }
  }

  void forward(const scalar_t* q, const scalar_t* k, const scalar_t* v, bool causal, acc_t eps,
               scalar_t* out) {
    if (causal) {
      std::fill(kv.begin(), kv.end(), acc_t(0));
    } else {
      total_state(k, v);
    }
    for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, S - c0);
      const acc_t* qc = features(q, c0, cn, qbuf);
      const acc_t* kc = causal ? features(k, c0, cn, kbuf) : nullptr;
      numerator_chunk(qc, kc, v, causal, c0, cn);
      if (causal) {
        gemm_rm<acc_t>(true, false, M, Dv1, cn, kc, M, vb.data(), Dv1, 1, kv.data(), Dv1);
      }
      for (int64_t i = 0; i < cn; ++i) {
        const acc_t d = math::linear_attention_den(ob[i * Dv1 + Dv], eps);
        store_scaled(ob.data() + i * Dv1, acc_t(1) / d, out + (c0 + i) * Dv, Dv);
      }
    }
  }

  void store_tile(const std::vector<acc_t>& src, scalar_t* dst, int64_t c0, int64_t cn,
                  int64_t width) {
    store_scaled(src.data(), acc_t(1), dst + c0 * width, cn * width);
  }

  void backward(const scalar_t* g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                bool causal, acc_t eps, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
    std::fill(qg.begin(), qg.end(), acc_t(0));
    if (!causal) {
      // KV' total; then per chunk out' -> G', QG += q^T G', dq = G' KV'^T; then dk, dv from QG.
      total_state(k, v);
      for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, S - c0);
        const acc_t* qc = features(q, c0, cn, qbuf);
        numerator_chunk(qc, nullptr, v, false, c0, cn);
        make_grads(g, eps, c0, cn);
        const acc_t* gc = gall.data() + c0 * Dv1;
        gemm_rm<acc_t>(true, false, M, Dv1, cn, qc, M, gc, Dv1, 1, qg.data(), Dv1);
        gemm_rm<acc_t>(false, true, cn, M, Dv1, gc, Dv1, kv.data(), Dv1, 0, dqb.data(), M);
        store_tile(dqb, dq, c0, cn, M);
      }
      for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, S - c0);
        const acc_t* kc = features(k, c0, cn, kbuf);
        load_values(v, c0, cn);
        gemm_rm<acc_t>(false, true, cn, M, Dv1, vb.data(), Dv1, qg.data(), Dv1, 0, dkb.data(), M);
        gemm_rm<acc_t>(false, false, cn, Dv, M, kc, M, qg.data(), Dv1, 0, dvb.data(), Dv);
        store_tile(dkb, dk, c0, cn, M);
        store_tile(dvb, dv, c0, cn, Dv);
      }
      return;
    }
    // Causal, forward direction: out' and G' with the prefix state KV', then dq.
    std::fill(kv.begin(), kv.end(), acc_t(0));
    for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, S - c0);
      const acc_t* qc = features(q, c0, cn, qbuf);
      const acc_t* kc = features(k, c0, cn, kbuf);
      numerator_chunk(qc, kc, v, true, c0, cn);
      make_grads(g, eps, c0, cn);
      const acc_t* gc = gall.data() + c0 * Dv1;
      gemm_rm<acc_t>(false, true, cn, M, Dv1, gc, Dv1, kv.data(), Dv1, 0, dqb.data(), M);
      gemm_rm<acc_t>(false, true, cn, cn, Dv1, gc, Dv1, vb.data(), Dv1, 0, tile_a.data(), kChunk);
      mask_upper(tile_a.data(), cn, kChunk);
      gemm_rm<acc_t>(false, false, cn, M, cn, tile_a.data(), kChunk, kc, M, 1, dqb.data(), M);
      store_tile(dqb, dq, c0, cn, M);
      gemm_rm<acc_t>(true, false, M, Dv1, cn, kc, M, vb.data(), Dv1, 1, kv.data(), Dv1);
    }
    // Causal, backward direction: dk and dv from the suffix state QG.
    const int64_t last = ((S - 1) / kChunk) * kChunk;
    for (int64_t c0 = last; c0 >= 0; c0 -= kChunk) {
      const int64_t cn = std::min(kChunk, S - c0);
      const acc_t* qc = features(q, c0, cn, qbuf);
      const acc_t* kc = features(k, c0, cn, kbuf);
      const acc_t* gc = gall.data() + c0 * Dv1;
      load_values(v, c0, cn);
      // A = tril(G' v'^T): A[s,t] = G'[s].v'[t]; D = tril(q k^T): D[s,t] = q[s].k[t].
      gemm_rm<acc_t>(false, true, cn, cn, Dv1, gc, Dv1, vb.data(), Dv1, 0, tile_a.data(), kChunk);
      mask_upper(tile_a.data(), cn, kChunk);
      gemm_rm<acc_t>(false, true, cn, cn, M, qc, M, kc, M, 0, tile_d.data(), kChunk);
      mask_upper(tile_d.data(), cn, kChunk);
      gemm_rm<acc_t>(false, true, cn, M, Dv1, vb.data(), Dv1, qg.data(), Dv1, 0, dkb.data(), M);
      gemm_rm<acc_t>(true, false, cn, M, cn, tile_a.data(), kChunk, qc, M, 1, dkb.data(), M);
      gemm_rm<acc_t>(false, false, cn, Dv, M, kc, M, qg.data(), Dv1, 0, dvb.data(), Dv);
      gemm_rm<acc_t>(true, false, cn, Dv, cn, tile_d.data(), kChunk, gc, Dv1, 1, dvb.data(), Dv);
      store_tile(dkb, dk, c0, cn, M);
      store_tile(dvb, dv, c0, cn, Dv);
      gemm_rm<acc_t>(true, false, M, Dv1, cn, qc, M, gc, Dv1, 1, qg.data(), Dv1);
    }
  }
};

}  // namespace

void linear_attention_forward_kernel(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                     const at::Tensor& v, bool causal, double eps,
                                     at::Tensor& out) {
  const int64_t BH = phi_q.size(0) * phi_q.size(1);
  const int64_t S = phi_q.size(2), M = phi_q.size(3), Dv = v.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, phi_q.scalar_type(), "linear_attention_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const scalar_t* q = phi_q.const_data_ptr<scalar_t>();
        const scalar_t* k = phi_k.const_data_ptr<scalar_t>();
        const scalar_t* vv = v.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
          Slice<scalar_t, acc_t> slice(S, M, Dv, /*with_grads=*/false);
          for (int64_t bh = begin; bh < end; ++bh) {
            slice.forward(q + bh * S * M, k + bh * S * M, vv + bh * S * Dv, causal,
                          static_cast<acc_t>(eps), o + bh * S * Dv);
          }
        });
      });
}

void linear_attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& phi_q,
                                      const at::Tensor& phi_k, const at::Tensor& v, bool causal,
                                      double eps, at::Tensor& grad_q, at::Tensor& grad_k,
                                      at::Tensor& grad_v) {
  const int64_t BH = phi_q.size(0) * phi_q.size(1);
  const int64_t S = phi_q.size(2), M = phi_q.size(3), Dv = v.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, phi_q.scalar_type(), "linear_attention_backward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* q = phi_q.const_data_ptr<scalar_t>();
        const scalar_t* k = phi_k.const_data_ptr<scalar_t>();
        const scalar_t* vv = v.const_data_ptr<scalar_t>();
        scalar_t* dq = grad_q.mutable_data_ptr<scalar_t>();
        scalar_t* dk = grad_k.mutable_data_ptr<scalar_t>();
        scalar_t* dv = grad_v.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
          Slice<scalar_t, acc_t> slice(S, M, Dv, /*with_grads=*/true);
          for (int64_t bh = begin; bh < end; ++bh) {
            slice.backward(g + bh * S * Dv, q + bh * S * M, k + bh * S * M, vv + bh * S * Dv,
                           causal, static_cast<acc_t>(eps), dq + bh * S * M, dk + bh * S * M,
                           dv + bh * S * Dv);
          }
        });
      });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
