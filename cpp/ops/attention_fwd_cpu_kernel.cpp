// Attention forward on CPU, FlashAttention-2 style (Dao 2023, Algorithm 1): for each query block
// the keys are visited in blocks, scores S = scale * Q K^T and the product P V are BLAS tile
// products (cpu_gemm.h), and the softmax is online (running max m and sum l per row, the output
// accumulator rescaled when m moves). The S x S matrix is never formed; per task the scratch is
// one score tile [G * qB, kKeyBlock] (and its bf16/fp16 copy), the stacked queries [G * qB, Dqk]
// and one output accumulator [G * qB, Dv], where G = Hq / Hkv and qB = query_block(G).
// Causal key blocks entirely above the diagonal are skipped. Saves lse = m + log(l) per row
// (+inf for a fully masked row, whose output is 0; see stackwise/attention_math.h).
//
// Shapes and layout: attention_kernels.h. Parallel over batch x kv heads x query blocks; the
// query heads of a GQA/MQA group share each K/V tile, which is read in place (never repeated).
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

// One score tile holds the same query block of every query head of a GQA group, stacked, so one
// K/V block (which the BLAS packs on every call) serves G heads: kTileRows rows in all (64 query
// rows per head at 4:1, 128 for MHA). Measured with bench/ops_attention.py's cases on a shared
// 2-core AVX-512/AMX Xeon (torch 2.14, MKL): rows in {64, 128, 256} x keys in {256, 512, 1024}
// all landed within that machine's +-15% run-to-run noise, for fp32 and bf16. 256 x 512 is the
// largest of them whose fp32 score tile (512 KiB) stays in the 2 MiB L2, and it amortises the
// BLAS's per-call packing of each K/V block over the most query rows.
constexpr int64_t kTileRows = 256;
constexpr int64_t kKeyBlock = 512;

inline int64_t query_block(int64_t group) {
  return std::clamp<int64_t>(kTileRows / group, 32, 128);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& key_bias, bool causal, double scale, at::Tensor& out,
                  at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3), G = Hq / Hkv;
  const int64_t qB = query_block(G), max_rows = G * qB;
  const int64_t q_blocks = (S + qB - 1) / qB;
  const auto Q = head_view<scalar_t>(q);
  const auto K = head_view<scalar_t>(k);
  const auto V = head_view<scalar_t>(v);
  scalar_t* o_data = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
  const acc_t* bias = key_bias.defined() ? key_bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scale);

  at::parallel_for(0, B * Hkv * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Scratch once per task: stacked queries, scores/probabilities (and their reduced copy),
    // the output accumulator, and the running max and sum of each row.
    std::vector<scalar_t> q_stack(G > 1 ? max_rows * Dqk : 0);
    std::vector<acc_t> s_tile(max_rows * kKeyBlock), acc(max_rows * Dv);
    std::vector<scalar_t> p_narrow(kReduced ? max_rows * kKeyBlock : 0);
    std::vector<acc_t> m(max_rows), l(max_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task % q_blocks, hk = (task / q_blocks) % Hkv;
      const int64_t b = task / (q_blocks * Hkv);
      const int64_t i0 = ib * qB, mq = std::min(qB, S - i0), rows = G * mq;
      const scalar_t* q_i = Q.row(b, hk * G, i0);
      int64_t ldq = Q.ss;
      if (G > 1) {  // row g * mq + r of the tile is query i0 + r of head hk * G + g
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t r = 0; r < mq; ++r) {
            std::copy_n(Q.row(b, hk * G + g, i0 + r), Dqk, q_stack.data() + (g * mq + r) * Dqk);
          }
        }
        q_i = q_stack.data();
        ldq = Dqk;
      }
      std::fill_n(acc.begin(), rows * Dv, acc_t(0));
      std::fill_n(m.begin(), rows, math::neg_inf<acc_t>());
      std::fill_n(l.begin(), rows, acc_t(0));
      const int64_t j_end = causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, j_end - j0);
        acc_t* s = s_tile.data();
        // S[rows, nk] = scale * Q K_j^T (row-major, ld nk).
        gemm(true, false, nk, rows, Dqk, sc, K.row(b, hk, j0), K.ss, q_i, ldq, acc_t(0), s, nk);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = s + r * nk;
          // Only the visible prefix is scored; the causally hidden tail gets p = 0.
          const int64_t vis = math::visible_keys(i0 + r % mq, j0, nk, causal);
          if (bias != nullptr) add_bias(row, bias + b * S + j0, vis);
          const acc_t m_new = std::max(m[r], row_max(row, vis));
          const acc_t alpha = math::rescale_factor(m[r], m_new);
          acc_t sum;
          if constexpr (kReduced) {
            scalar_t* p_row = p_narrow.data() + r * nk;
            sum = exp_shift_sum_narrow(row, math::safe_max(m_new), vis, p_row);
            std::fill(p_row + vis, p_row + nk, scalar_t(0));
          } else {
            sum = exp_shift_sum(row, math::safe_max(m_new), vis);
            std::fill(row + vis, row + nk, acc_t(0));
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != acc_t(1)) scale_row(acc.data() + r * Dv, alpha, Dv);
        }
        const scalar_t* p;
        if constexpr (kReduced) {
          p = p_narrow.data();
        } else {
          p = s;
        }
        // acc[rows, Dv] += P[rows, nk] V_j[nk, Dv].
        gemm(false, false, Dv, rows, nk, acc_t(1), V.row(b, hk, j0), V.ss, p, nk, acc_t(1),
             acc.data(), Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = hk * G + r / mq, i = i0 + r % mq;
        store_scaled(acc.data() + r * Dv, math::inverse_sum(l[r]),
                     o_data + ((b * Hq + h) * S + i) * Dv, Dv);
        lse_data[(b * Hq + h) * S + i] = math::final_lse(m[r], l[r]);
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
