// Attention backward on CPU, FlashAttention-2 style (Dao 2023, Algorithm 2). With
// D = rowsum(dO * O) precomputed per query block, each (query block, key block) tile recomputes
//   P = exp(scale * Q K^T - lse)              (masked keys and fully masked rows give 0)
//   dV_j += P^T dO_i,   dP = dO_i V_j^T,   dS = P * (dP - D)
//   dQ_i += scale * dS K_j,   dK_j += scale * dS^T Q_i
// with every product a BLAS tile product (cpu_gemm.h). Memory: the inputs, lse and per-thread
// tiles; never S x S.
//
// Parallel over batch x query heads: a task owns its query head's rows of dQ (accumulated per
// query block in an fp32 tile) and its own [S, D] slices of dk_acc/dv_acc, so there are no races
// and no atomics; the dispatcher then sums each GQA group's slices in a fixed order, which keeps
// the result deterministic. Causal key blocks above the diagonal are skipped.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attention_kernels.h"
#include "attention_tile_cpu.h"
#include "cpu_gemm.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

using namespace attention_tile;

// Tile sizes measured with bench/ops_attention.py (fwd+bwd, GQA 8:2, S 1024/2048, D 64/128) on a
// 2-core AVX-512/AMX Xeon: 128 x 256 beat 64 x 256 and 64 x 128 by 5-20% (fp32 and bf16); 128 x
// 512 and 256 x 256 were no better. Five [128, 256] fp32 tiles (P, dS and their bf16 copies)
// plus the dQ accumulator stay within L2.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 256;
// P and dS rows are padded by one cache line: at a 1 KiB stride every fourth row of a tile maps to
// the same L1 sets, which the transposed reads of dV += P^T dO and dK += dS^T Q walk down.
constexpr int64_t kRowPad = 16;

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& key_bias, bool causal, double scale, at::Tensor& grad_q,
                   at::Tensor& dk_acc, at::Tensor& dv_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3), group = Hq / Hkv;
  const auto Q = head_view<scalar_t>(q);
  const auto K = head_view<scalar_t>(k);
  const auto V = head_view<scalar_t>(v);
  const auto O = head_view<scalar_t>(out);
  const auto dO = head_view<scalar_t>(grad_out);
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();
  const acc_t* bias = key_bias.defined() ? key_bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dq_data = grad_q.mutable_data_ptr<scalar_t>();
  acc_t* dk_data = dk_acc.mutable_data_ptr<acc_t>();
  acc_t* dv_data = dv_acc.mutable_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);

  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile = kQueryBlock * (kKeyBlock + kRowPad);
    std::vector<acc_t> p_tile(tile), ds_tile(tile), dq(kQueryBlock * Dqk), d_row(kQueryBlock);
    std::vector<scalar_t> p_narrow(kReduced ? tile : 0), ds_narrow(kReduced ? tile : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
      acc_t* dk = dk_data + bh * S * Dqk;
      acc_t* dv = dv_data + bh * S * Dv;
      for (int64_t i0 = 0; i0 < S; i0 += kQueryBlock) {
        const int64_t mq = std::min(kQueryBlock, S - i0);
        const scalar_t* q_i = Q.row(b, h, i0);
        const scalar_t* do_i = dO.row(b, h, i0);
        const acc_t* lse_i = lse_data + bh * S + i0;
        for (int64_t r = 0; r < mq; ++r) {
          const scalar_t* o_r = O.row(b, h, i0 + r);
          const scalar_t* g_r = do_i + r * dO.ss;
          acc_t d = 0;
          for (int64_t c = 0; c < Dv; ++c) d += acc_t(g_r[c]) * acc_t(o_r[c]);
          d_row[r] = d;
        }
        std::fill(dq.begin(), dq.end(), acc_t(0));
        const int64_t j_end = causal ? std::min(S, i0 + mq) : S;
        for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
          const int64_t nk = std::min(kKeyBlock, j_end - j0), ld = nk + kRowPad;
          const scalar_t* k_j = K.row(b, hk, j0);
          const scalar_t* v_j = V.row(b, hk, j0);
          acc_t* p = p_tile.data();
          acc_t* ds = ds_tile.data();
          gemm(true, false, nk, mq, Dqk, sc, k_j, K.ss, q_i, Q.ss, acc_t(0), p, ld);
          for (int64_t r = 0; r < mq; ++r) {
            acc_t* row = p + r * ld;
            if (bias != nullptr) add_bias(row, bias + b * S + j0, nk);
            if (causal) mask_tail(row, math::visible_keys(i0 + r, j0, nk, true), nk);
            if constexpr (kReduced) {
              exp_shift_narrow(row, lse_i[r], nk, p_narrow.data() + r * ld);
            } else {
              exp_shift(row, lse_i[r], nk);
            }
          }
          const scalar_t* p_op;
          if constexpr (kReduced) {
            p_op = p_narrow.data();
          } else {
            p_op = p;
          }
          // dV_j[nk, Dv] += P^T dO_i.
          gemm(false, true, Dv, nk, mq, acc_t(1), do_i, dO.ss, p_op, ld, acc_t(1), dv + j0 * Dv,
               Dv);
          // dP[mq, nk] = dO_i V_j^T, then dS = P * (dP - D) in place.
          gemm(true, false, nk, mq, Dv, acc_t(1), v_j, V.ss, do_i, dO.ss, acc_t(0), ds, ld);
          const scalar_t* ds_op;
          if constexpr (kReduced) {
            for (int64_t r = 0; r < mq; ++r) {
              score_grad_narrow(p + r * ld, ds + r * ld, d_row[r], nk, ds_narrow.data() + r * ld);
            }
            ds_op = ds_narrow.data();
          } else {
            for (int64_t r = 0; r < mq; ++r) score_grad(p + r * ld, ds + r * ld, d_row[r], nk);
            ds_op = ds;
          }
          // dQ_i[mq, Dqk] += scale * dS K_j;  dK_j[nk, Dqk] += scale * dS^T Q_i.
          gemm(false, false, Dqk, mq, nk, sc, k_j, K.ss, ds_op, ld, acc_t(1), dq.data(), Dqk);
          gemm(false, true, Dqk, nk, mq, sc, q_i, Q.ss, ds_op, ld, acc_t(1), dk + j0 * Dqk, Dqk);
        }
        scalar_t* dq_i = dq_data + (bh * S + i0) * Dqk;
        store_scaled(dq.data(), acc_t(1), dq_i, mq * Dqk);
      }
    }
  });
}

}  // namespace

void attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& key_bias, bool causal,
                               double scale, at::Tensor& grad_q, at::Tensor& dk_acc,
                               at::Tensor& dv_acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "attention_backward_cpu", [&] {
        backward_impl<scalar_t>(grad_out, q, k, v, out, lse, key_bias, causal, scale, grad_q,
                                dk_acc, dv_acc);
      });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
