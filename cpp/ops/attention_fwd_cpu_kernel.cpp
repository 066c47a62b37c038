// Attention forward on CPU, FlashAttention-2 style (Dao 2023, Algorithm 1): for each query block
// the keys are visited in blocks, scores S = scale * Q K^T and the product P V are BLAS tile
// products (cpu_gemm.h), and the softmax is online (running max m and sum l per row, the output
// accumulator rescaled when m moves). The S x S matrix is never formed; per task the scratch is
// one score tile [G * qB, kKeyBlock] (and its bf16/fp16 copy), the stacked queries [G * qB, Dqk]
// and one output accumulator [G * qB, Dv], where G = Hq / Hkv and qB = query_block(G).
// Causal key blocks entirely above the diagonal are skipped. Saves lse = m + log(l) per row
// (+inf for a fully masked row, whose output is 0; see stackwise/attention_math.h).
//
// bf16/fp16 on CPUs where oneDNN's brgemm runs them (AMX; vnni_gemm_available) take a packed
// path instead: each K/V block is packed once per call into the VNNI layout (attention_pack_cpu.h)
// and reused by every query tile and every query head of its group, both products run on the
// packed operands with fp32 accumulation, and the scale is fused into the exp pass. Elsewhere
// (no AMX, mkldnn disabled, odd Dqk, a non-AVX512 kernel build) the BLAS path below runs.
//
// Shapes and layout: attention_kernels.h. Parallel over batch x kv heads x query blocks; the
// query heads of a GQA/MQA group share each K/V tile, which is read in place (never repeated).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <memory>
#include <vector>

#include "attention_kernels.h"
#include "attention_pack_cpu.h"
#include "attention_tile_cpu.h"
#include "cpu_alloc.h"
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

// Packed-path tiles, measured single-threaded with CPU time against SDPA in the same process
// (bench/ops_attention.py's bf16 cases, 2-core AVX-512/AMX Xeon, torch 2.14): 128 query rows x
// 512 keys; 256 rows were 0-5% slower at S=512 and within noise elsewhere, 256 keys 5-15% slower
// for D=128. Rows of the score and probability tiles are padded by one cache line (16 floats, 32
// bf16): with a 2 KiB row stride every AMX tile row maps to the same few L1 sets, and the padding
// made the whole forward 5-8% faster.
constexpr int64_t kPackedTileRows = 128;
constexpr int64_t kPackedKeyBlock = 512;
constexpr int64_t kScorePad = 16, kProbPad = 32;

inline int64_t packed_query_block(int64_t group) {
  return std::clamp<int64_t>(kPackedTileRows / group, 16, 128);
}

// Per-thread scratch of the packed path, kept across calls and grown on demand (about 1 MiB per
// thread at 128 rows x 512 keys), which saves the page faults of a fresh buffer on every call.
// 64-byte aligned like SDPA's buffers: an AMX tile row is one cache line, and std::vector only
// guarantees 16 bytes.
class TileScratch {
 public:
  // Pointers to consecutive 64-byte aligned regions of the given byte sizes.
  template <size_t N>
  std::array<char*, N> carve(const std::array<size_t, N>& bytes) {
    size_t total = 0;
    for (size_t b : bytes) total += round_up(b);
    if (total > size_) {
      buf_.reset(static_cast<char*>(std::aligned_alloc(64, total)));
      TORCH_CHECK(buf_ != nullptr, "attention_forward: out of memory for ", total, " bytes");
      size_ = total;
    }
    std::array<char*, N> out{};
    char* p = buf_.get();
    for (size_t i = 0; i < N; ++i) {
      out[i] = p;
      p += round_up(bytes[i]);
    }
    return out;
  }

 private:
  static size_t round_up(size_t b) { return (b + 63) & ~size_t(63); }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> buf_;
  size_t size_ = 0;
};

// The packed path (see the file comment). Same task split and online softmax as forward_impl;
// the tiles, the products and the placement of the scale differ.
template <typename scalar_t>
void forward_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& key_bias, bool causal, double scale, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3), G = Hq / Hkv;
  const int64_t qB = packed_query_block(G), max_rows = G * qB;
  const int64_t q_blocks = (S + qB - 1) / qB;
  const int64_t kB = kPackedKeyBlock, k_blocks = (S + kB - 1) / kB;
  const auto Q = head_view<scalar_t>(q);
  const auto K = head_view<scalar_t>(k);
  const auto V = head_view<scalar_t>(v);
  scalar_t* o_data = out.mutable_data_ptr<scalar_t>();
  float* lse_data = lse.mutable_data_ptr<float>();
  const float* bias = key_bias.defined() ? key_bias.const_data_ptr<float>() : nullptr;

  // Packed K^T and V blocks of every (batch, kv head), block jb at offset jb * kB * D. The
  // packing reads K and V once; the BLAS path re-packed each block on every call.
  const int64_t k_stride = k_blocks * kB * Dqk, v_stride = k_blocks * kB * Dv;
  const at::Tensor packed = empty_output({B * Hkv * (k_stride + v_stride)}, q.options());
  scalar_t* const k_base = packed.mutable_data_ptr<scalar_t>();
  scalar_t* const v_base = k_base + B * Hkv * k_stride;
  at::parallel_for(0, B * Hkv * k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t jb = t % k_blocks, bh = t / k_blocks, b = bh / Hkv, hk = bh % Hkv;
      const int64_t j0 = jb * kB, nk = std::min(kB, S - j0);
      pack_keys_vnni(K.row(b, hk, j0), K.ss, nk, Dqk, k_base + bh * k_stride + j0 * Dqk);
      pack_values_vnni(V.row(b, hk, j0), V.ss, nk, Dv, v_base + bh * v_stride + j0 * Dv);
    }
  });

  // The products leave the scale out; for scale > 0 it commutes with the max and with the
  // 0/-inf padding bias, so the exp pass applies it. Any other scale is applied to the tile.
  const float sc = static_cast<float>(scale);
  const bool fused_scale = sc > 0.f;
  const float exp_scale = fused_scale ? sc : 1.f;

  // p = exp(s * exp_scale - shift) rounded to scalar_t, returning the fp32 sum.
  auto exp_row = [](const float* row, float scale, float shift, int64_t n, scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (cpu_has_avx512_bf16()) return exp_scaled_sum_bf16_hw(row, scale, shift, n, p);
    }
#endif
    return exp_scaled_sum_narrow(row, scale, shift, n, p);
  };

  at::parallel_for(0, B * Hkv * q_blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local TileScratch scratch;
    const size_t f4 = sizeof(float), f2 = sizeof(scalar_t);
    const auto [q_raw, s_raw, p_raw, acc_raw, m_raw, l_raw] = scratch.carve<6>(
        {G > 1 ? max_rows * Dqk * f2 : 0, max_rows * (kB + kScorePad) * f4,
         max_rows * (kB + kProbPad) * f2, max_rows * Dv * f4, max_rows * f4, max_rows * f4});
    scalar_t* const q_stack = reinterpret_cast<scalar_t*>(q_raw);
    float* const s_tile = reinterpret_cast<float*>(s_raw);
    scalar_t* const p_narrow = reinterpret_cast<scalar_t*>(p_raw);
    float* const acc = reinterpret_cast<float*>(acc_raw);
    float* const m = reinterpret_cast<float*>(m_raw);
    float* const l = reinterpret_cast<float*>(l_raw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task % q_blocks, hk = (task / q_blocks) % Hkv;
      const int64_t b = task / (q_blocks * Hkv), bh = b * Hkv + hk;
      const int64_t i0 = ib * qB, mq = std::min(qB, S - i0), rows = G * mq;
      const scalar_t* q_i = Q.row(b, hk * G, i0);
      int64_t ldq = Q.ss;
      if (G > 1) {  // row g * mq + r of the tile is query i0 + r of head hk * G + g
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t r = 0; r < mq; ++r) {
            std::copy_n(Q.row(b, hk * G + g, i0 + r), Dqk, q_stack + (g * mq + r) * Dqk);
          }
        }
        q_i = q_stack;
        ldq = Dqk;
      }
      std::fill_n(m, rows, math::neg_inf<float>());
      std::fill_n(l, rows, 0.f);
      const int64_t j_end = causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < j_end; j0 += kB) {
        const int64_t nk = std::min(kB, j_end - j0), nk_pad = round_even(nk);
        // Packed width of this block (wider than nk where the causal diagonal cuts it).
        const int64_t ldk = round_even(std::min(kB, S - j0));
        const scalar_t* k_j = k_base + bh * k_stride + j0 * Dqk;
        const scalar_t* v_j = v_base + bh * v_stride + j0 * Dv;
        float* s = s_tile;
        // S[rows, nk] = Q K_j^T, unscaled.
        const int64_t lds = nk + kScorePad, ldp = nk_pad + kProbPad;
        vnni_gemm(rows, nk, Dqk, ldq, ldk, lds, false, q_i, k_j, s);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = s + r * lds;
          const int64_t vis = math::visible_keys(i0 + r % mq, j0, nk, causal);
          if (!fused_scale) scale_row(row, sc, vis);
          if (bias != nullptr) add_bias(row, bias + b * S + j0, vis);
          const float m_new = std::max(m[r], exp_scale * row_max_unrolled(row, vis));
          const float alpha = math::rescale_factor(m[r], m_new);
          scalar_t* p_row = p_narrow + r * ldp;
          const float sum = exp_row(row, exp_scale, math::safe_max(m_new), vis, p_row);
          std::fill(p_row + vis, p_row + nk_pad, scalar_t(0));
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (j0 > 0 && alpha != 1.f) scale_row(acc + r * Dv, alpha, Dv);
        }
        // acc[rows, Dv] (+)= P[rows, nk_pad] V_j[nk_pad, Dv]; the first block overwrites.
        vnni_gemm(rows, Dv, nk_pad, ldp, Dv, Dv, j0 > 0, p_narrow, v_j, acc);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = hk * G + r / mq, i = i0 + r % mq;
        store_scaled(acc + r * Dv, math::inverse_sum(l[r]),
                     o_data + ((b * Hq + h) * S + i) * Dv, Dv);
        lse_data[(b * Hq + h) * S + i] = math::final_lse(m[r], l[r]);
      }
    }
    vnni_gemm_release();
  });
}

// The BLAS path. As in the packed path, score rows are padded by one cache line (a 2 KiB stride
// maps every row to the same few L1 sets), the scratch is per thread and kept across calls, and
// the row max uses independent accumulators; the first key block's P V product overwrites acc
// instead of a zero fill and a rescale. Together (single-threaded CPU time, bench shapes, 2-core
// AVX-512 Xeon) they cut the fp32 forward by 2-8% non-causal and 5-10% causal.
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
  constexpr int64_t kPad = 64 / sizeof(acc_t);

  at::parallel_for(0, B * Hkv * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls: stacked queries, scores/probabilities (and their
    // reduced copy), the output accumulator, and the running max and sum of each row.
    thread_local TileScratch scratch;
    const size_t fa = sizeof(acc_t), fs = sizeof(scalar_t);
    const int64_t ld_max = kKeyBlock + kPad;
    const auto [q_raw, s_raw, p_raw, acc_raw, m_raw, l_raw] = scratch.carve<6>(
        {G > 1 ? max_rows * Dqk * fs : 0, max_rows * ld_max * fa,
         kReduced ? max_rows * ld_max * fs : 0, max_rows * Dv * fa, max_rows * fa,
         max_rows * fa});
    scalar_t* const q_stack = reinterpret_cast<scalar_t*>(q_raw);
    acc_t* const s_tile = reinterpret_cast<acc_t*>(s_raw);
    scalar_t* const p_narrow = reinterpret_cast<scalar_t*>(p_raw);
    acc_t* const acc = reinterpret_cast<acc_t*>(acc_raw);
    acc_t* const m = reinterpret_cast<acc_t*>(m_raw);
    acc_t* const l = reinterpret_cast<acc_t*>(l_raw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task % q_blocks, hk = (task / q_blocks) % Hkv;
      const int64_t b = task / (q_blocks * Hkv);
      const int64_t i0 = ib * qB, mq = std::min(qB, S - i0), rows = G * mq;
      const scalar_t* q_i = Q.row(b, hk * G, i0);
      int64_t ldq = Q.ss;
      if (G > 1) {  // row g * mq + r of the tile is query i0 + r of head hk * G + g
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t r = 0; r < mq; ++r) {
            std::copy_n(Q.row(b, hk * G + g, i0 + r), Dqk, q_stack + (g * mq + r) * Dqk);
          }
        }
        q_i = q_stack;
        ldq = Dqk;
      }
      std::fill_n(m, rows, math::neg_inf<acc_t>());
      std::fill_n(l, rows, acc_t(0));
      const int64_t j_end = causal ? std::min(S, i0 + mq) : S;
      for (int64_t j0 = 0; j0 < j_end; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, j_end - j0), lds = nk + kPad;
        acc_t* s = s_tile;
        // S[rows, nk] = scale * Q K_j^T (row-major, ld lds).
        gemm(true, false, nk, rows, Dqk, sc, K.row(b, hk, j0), K.ss, q_i, ldq, acc_t(0), s, lds);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = s + r * lds;
          // Only the visible prefix is scored; the causally hidden tail gets p = 0.
          const int64_t vis = math::visible_keys(i0 + r % mq, j0, nk, causal);
          if (bias != nullptr) add_bias(row, bias + b * S + j0, vis);
          acc_t tile_max;
          if constexpr (std::is_same_v<acc_t, float>) {
            tile_max = row_max_unrolled(row, vis);
          } else {
            tile_max = row_max(row, vis);
          }
          const acc_t m_new = std::max(m[r], tile_max);
          const acc_t alpha = math::rescale_factor(m[r], m_new);
          acc_t sum;
          if constexpr (kReduced) {
            scalar_t* p_row = p_narrow + r * lds;
            sum = exp_shift_sum_narrow(row, math::safe_max(m_new), vis, p_row);
            std::fill(p_row + vis, p_row + nk, scalar_t(0));
          } else {
            sum = exp_shift_sum(row, math::safe_max(m_new), vis);
            std::fill(row + vis, row + nk, acc_t(0));
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          // The first key block overwrites acc (beta = 0 below), so it needs no rescale.
          if (j0 > 0 && alpha != acc_t(1)) scale_row(acc + r * Dv, alpha, Dv);
        }
        const scalar_t* p;
        if constexpr (kReduced) {
          p = p_narrow;
        } else {
          p = s;
        }
        // acc[rows, Dv] (+)= P[rows, nk] V_j[nk, Dv]; the first key block overwrites.
        gemm(false, false, Dv, rows, nk, acc_t(1), V.row(b, hk, j0), V.ss, p, lds,
             acc_t(j0 > 0 ? 1 : 0), acc, Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = hk * G + r / mq, i = i0 + r % mq;
        store_scaled(acc + r * Dv, math::inverse_sum(l[r]),
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
    if constexpr (!std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
#if defined(CPU_CAPABILITY_AVX512)
      if (q.size(3) > 0 && q.size(3) % 2 == 0 && vnni_gemm_available(q.scalar_type())) {
        forward_packed<scalar_t>(q, k, v, key_bias, causal, scale, out, lse);
        return;
      }
#endif
    }
    forward_impl<scalar_t>(q, k, v, key_bias, causal, scale, out, lse);
  });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
