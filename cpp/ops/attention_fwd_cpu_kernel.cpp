// Attention forward on CPU, FlashAttention-2 style (Dao 2023, Algorithm 1): for each query block
// the keys are visited in blocks, scores S = scale * Q K^T and the product P V are BLAS tile
// products (cpu_gemm.h), and the softmax is online (running max m and sum l per row, the output
// accumulator rescaled when m moves). The S x S matrix is never formed; per thread the scratch is
// one score tile [kQueryBlock, kKeyBlock] and one output accumulator [kQueryBlock, Dv].
// Causal key blocks entirely above the diagonal are skipped. Saves lse = m + log(l) per row
// (+inf for a fully masked row, whose output is 0; see stackwise/attention_math.h).
//
// Shapes and layout: attention_kernels.h. Parallel over batch x query heads x query blocks; GQA
// reads kv head h / (Hq / Hkv) in place, without repeating K/V.
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

// Block sizes, measured on a 2-core Xeon (AVX-512, AMX) with torch 2.14's MKL (bench/ops_attention.py):
// see the comment in attention_bwd_cpu_kernel.cpp for the backward's.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 512;

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& key_bias, bool causal, double scale, at::Tensor& out,
                  at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3), group = Hq / Hkv;
  const int64_t q_blocks = (S + kQueryBlock - 1) / kQueryBlock;
  const auto Q = head_view<scalar_t>(q);
  const auto K = head_view<scalar_t>(k);
  const auto V = head_view<scalar_t>(v);
  scalar_t* o_data = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
  const acc_t* bias = key_bias.defined() ? key_bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);

  at::parallel_for(0, B * Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Scratch once per task: scores/probabilities, their reduced copy, accumulator, m and l.
    std::vector<acc_t> s_tile(kQueryBlock * kKeyBlock);
    std::vector<scalar_t> p_narrow(std::is_same_v<scalar_t, acc_t> ? 0 : kQueryBlock * kKeyBlock);
    std::vector<acc_t> acc(kQueryBlock * Dv), m(kQueryBlock), l(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task % q_blocks, h = (task / q_blocks) % Hq, b = task / (q_blocks * Hq);
      const int64_t hk = h / group, i0 = ib * kQueryBlock, mq = std::min(kQueryBlock, S - i0);
      const scalar_t* q_i = Q.row(b, h, i0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), math::neg_inf<acc_t>());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t j_end = causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, j_end - j0);
        acc_t* s = s_tile.data();
        // S[mq, nk] = scale * Q_i K_j^T (row-major, ld nk).
        gemm(true, false, nk, mq, Dqk, sc, K.row(b, hk, j0), K.ss, q_i, Q.ss, acc_t(0), s, nk);
        for (int64_t r = 0; r < mq; ++r) {
          acc_t* row = s + r * nk;
          if (bias != nullptr) add_bias(row, bias + b * S + j0, nk);
          if (causal) mask_tail(row, math::visible_keys(i0 + r, j0, nk, true), nk);
          const acc_t m_new = std::max(m[r], row_max(row, nk));
          const acc_t alpha = math::rescale_factor(m[r], m_new);
          const acc_t sum = exp_shift_sum(row, math::safe_max(m_new), nk);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != acc_t(1)) scale_row(acc.data() + r * Dv, alpha, Dv);
        }
        const scalar_t* p = gemm_operand(s, p_narrow.data(), mq * nk);
        // acc[mq, Dv] += P[mq, nk] V_j[nk, Dv].
        gemm(false, false, Dv, mq, nk, acc_t(1), V.row(b, hk, j0), V.ss, p, nk, acc_t(1),
             acc.data(), Dv);
      }
      scalar_t* o_i = o_data + ((b * Hq + h) * S + i0) * Dv;
      acc_t* lse_i = lse_data + (b * Hq + h) * S + i0;
      for (int64_t r = 0; r < mq; ++r) {
        store_scaled(acc.data() + r * Dv, math::inverse_sum(l[r]), o_i + r * Dv, Dv);
        lse_i[r] = math::final_lse(m[r], l[r]);
      }
    }
  });
}

}  // namespace

void attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& key_bias, bool causal, double scale,
                              at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, key_bias, causal, scale, out, lse);
  });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
