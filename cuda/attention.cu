// Scaled dot-product attention on CUDA: the FlashAttention-2 forward and backward (Dao 2023,
// Algorithms 1 and 2) for bf16/fp16 q, k, v with fp32 accumulation, on tensor cores through
// WMMA 16x16x16 fragments. Same schema, conventions and saved log-sum-exp as the CPU op; the
// scalar conventions (masked scores, running max, rescale factor, fully masked rows, dS) come
// from stackwise/attention_math.h, which the CPU tests cover.
//
// Forward: a thread block owns BM query rows of one (batch, head), one warp per 16 rows. K/V
// tiles of BN keys stream through shared memory; S = Q K^T runs on tensor cores into a float
// tile, each warp applies the online softmax to its rows (two lanes per row), rescales its rows
// of the float output accumulator and adds P V on tensor cores. No S x S matrix exists anywhere;
// under causal masking the tiles above the diagonal are never loaded.
//
// Backward: a preprocessing kernel computes D = rowsum(dO * O). A thread block owns BN keys of
// one (batch, kv head), one warp per 16 keys, and keeps dK and dV for them in register
// fragments; for every query head of its GQA group (K/V are never repeated) and every query
// tile it recomputes S^T and P^T from the saved log-sum-exp, forms dP^T = V dO^T and
// dS = P * (dP - D), adds P^T dO into dV and dS^T Q into dK, and adds dS K into a float dQ
// buffer with atomics (so dQ's last bits may vary from run to run).
//
// Head dims (Dqk, Dv): the pairs of stackwise/attention_dispatch.h (32, 64, 96, 128, 256 and MLA's
// (192, 128)); the code is the same template for each, written for any multiple of 16. The tile
// shape is the largest whose shared memory fits the device's per-block limit (read from the
// device).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstddef>
#include <optional>
#include <tuple>

#include "attention_tiles.cuh"
#include "common.cuh"
#include "attention_checks.h"
#include "stackwise/attention_dispatch.h"
#include "stackwise/attention_math.h"

namespace stackwise::cuda {
namespace {

template <typename T, int DQK, int DV, int BM, int BN>
struct FwdSmem {
  static constexpr int LDQ = DQK + 8, LDV = DV + 8, LDS = BN + 4, LDP = BN + 8, LDO = DV + 4;
  static constexpr size_t kQ = size_t(BM) * LDQ * sizeof(T);
  static constexpr size_t kK = size_t(BN) * LDQ * sizeof(T);
  static constexpr size_t kV = size_t(BN) * LDV * sizeof(T);
  static constexpr size_t kS = size_t(BM) * LDS * sizeof(float);
  static constexpr size_t kP = size_t(BM) * LDP * sizeof(T);
  static constexpr size_t kO = size_t(BM) * LDO * sizeof(float);
  static constexpr size_t kRows = size_t(3) * BM * sizeof(float);
  static constexpr size_t bytes = kQ + kK + kV + kS + kP + kO + kRows;
};

template <typename T, int DQK, int DV, int BM, int BN>
__global__ void __launch_bounds__(BM / 16 * 32) attention_forward_kernel(FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = FwdSmem<T, DQK, DV, BM, BN>;
  constexpr int kWarps = BM / 16, kThreads = kWarps * 32;
  constexpr int LDQ = L::LDQ, LDV = L::LDV, LDS = L::LDS, LDP = L::LDP, LDO = L::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::kQ);
  T* sV = reinterpret_cast<T*>(smem + L::kQ + L::kK);
  float* sS = reinterpret_cast<float*>(smem + L::kQ + L::kK + L::kV);
  T* sP = reinterpret_cast<T*>(smem + L::kQ + L::kK + L::kV + L::kS);
  float* sO = reinterpret_cast<float*>(smem + L::kQ + L::kK + L::kV + L::kS + L::kP);
  float* sM = sO + BM * LDO;  // running max per row
  float* sL = sM + BM;        // running sum per row
  float* sF = sL + BM;        // this tile's rescale factor per row

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int seq = p.seq;
  const T* qg = static_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh;
  const T* kg = static_cast<const T*>(p.k.ptr) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.ptr) + b * p.v.sb + hk * p.v.sh;
  const bool* mask_row = p.mask == nullptr ? nullptr : p.mask + int64_t(b) * seq;

  load_rows<T, BM, DQK, LDQ>(sQ, qg, p.q.ss, m0, seq, tid, kThreads);
  for (int i = tid; i < BM * LDO; i += kThreads) sO[i] = 0.f;
  for (int i = tid; i < BM; i += kThreads) {
    sM[i] = math::neg_inf<float>();
    sL[i] = 0.f;
  }
  const int r0 = warp * 16;
  const int n_end = p.causal ? min(seq, m0 + BM) : seq;
  for (int n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // the previous tile's K/V are no longer read (and the setup is visible)
    load_rows<T, BN, DQK, LDQ>(sK, kg, p.k.ss, n0, seq, tid, kThreads);
    load_rows<T, BN, DV, LDV>(sV, vg, p.v.ss, n0, seq, tid, kThreads);
    __syncthreads();

    // S (this warp's 16 rows x BN) = Q K^T.
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      Acc acc;
      wmma::fill_fragment(acc, 0.f);
      mma_k<DQK / 16, T, wmma::row_major, wmma::col_major>(acc, sQ + r0 * LDQ, LDQ,
                                                           sK + nt * 16 * LDQ, LDQ);
      wmma::store_matrix_sync(sS + r0 * LDS + nt * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: two lanes per row, interleaved columns.
    {
      const int row = r0 + lane / 2, half = lane % 2;
      const int i = m0 + row;
      float mx = math::neg_inf<float>();
      for (int c = half; c < BN; c += 2) {
        const int j = n0 + c;
        const bool vis = j < seq && math::key_visible(i, j, p.causal) && key_allowed(mask_row, j);
        const float s = vis ? sS[row * LDS + c] * p.scale : math::neg_inf<float>();
        sS[row * LDS + c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = sM[row];
      const float m_new = fmaxf(m_old, mx);
      const float base = math::safe_max(m_new);
      float sum = 0.f;
      for (int c = half; c < BN; c += 2) {
        const float pv = math::attn_exp(sS[row * LDS + c] - base);
        sP[row * LDP + c] = from_float<T>(pv);
        sum += pv;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      if (half == 0) {
        const float f = math::rescale_factor(m_old, m_new);
        sF[row] = f;
        sL[row] = sL[row] * f + sum;
        sM[row] = m_new;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * DV; idx += 32) {
      const int rr = idx / DV, c = idx % DV;
      sO[(r0 + rr) * LDO + c] *= sF[r0 + rr];
    }
    __syncwarp();

    // O (16 x Dv) += P V.
#pragma unroll
    for (int dt = 0; dt < DV / 16; ++dt) {
      Acc acc;
      wmma::load_matrix_sync(acc, sO + r0 * LDO + dt * 16, LDO, wmma::mem_row_major);
      mma_k<BN / 16, T, wmma::row_major, wmma::row_major>(acc, sP + r0 * LDP, LDP, sV + dt * 16,
                                                          LDV);
      wmma::store_matrix_sync(sO + r0 * LDO + dt * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();

  // Epilogue: normalise this warp's rows and write them with 16-byte stores.
  T* og = static_cast<T*>(p.out) + (int64_t(b) * p.hq + h) * seq * DV;
  for (int idx = lane; idx < 16 * (DV / 8); idx += 32) {
    const int rr = idx / (DV / 8), c8 = idx % (DV / 8);
    const int row = r0 + rr, i = m0 + row;
    if (i >= seq) continue;
    const float inv = math::inverse_sum(sL[row]);
    alignas(16) T vals[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vals[e] = from_float<T>(sO[row * LDO + c8 * 8 + e] * inv);
    *reinterpret_cast<uint4*>(og + int64_t(i) * DV + c8 * 8) = *reinterpret_cast<uint4*>(vals);
  }
  if (lane < 16) {
    const int row = r0 + lane, i = m0 + row;
    if (i < seq) {
      p.lse[(int64_t(b) * p.hq + h) * seq + i] = math::final_lse(sM[row], sL[row]);
    }
  }
#else
  __trap();  // bf16/fp16 tensor-core fragments need sm_80 or newer
#endif
}

// D[row] = sum_c dO[row, c] * O[row, c] in float, one warp per row.
template <typename T, int DV>
__global__ void attention_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                       float* __restrict__ delta, int64_t rows) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    float acc = 0.f;
    for (int c = lane; c < DV; c += 32) {
      acc += to_float<T>(dout[r * DV + c]) * to_float<T>(out[r * DV + c]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[r] = acc;
  }
}

template <typename T, int DQK, int DV, int BM, int BN>
struct BwdSmem {
  static constexpr int LDQ = DQK + 8, LDV = DV + 8, LDF = BM + 4, LDT = BM + 8, LDX = 20;
  static constexpr size_t kK = size_t(BN) * LDQ * sizeof(T);
  static constexpr size_t kV = size_t(BN) * LDV * sizeof(T);
  static constexpr size_t kQ = size_t(BM) * LDQ * sizeof(T);
  static constexpr size_t kDO = size_t(BM) * LDV * sizeof(T);
  static constexpr size_t kF = size_t(BN) * LDF * sizeof(float);  // S^T and dP^T, each
  static constexpr size_t kT = size_t(BN) * LDT * sizeof(T);      // P^T and dS^T, each
  static constexpr size_t kRows = size_t(2) * BM * sizeof(float);
  static constexpr size_t kX = size_t(BN / 16) * 16 * LDX * sizeof(float);  // per-warp scratch
  static constexpr size_t bytes = kK + kV + kQ + kDO + 2 * kF + 2 * kT + kRows + kX;
};

template <typename T, int DQK, int DV, int BM, int BN>
__global__ void __launch_bounds__(BN / 16 * 32) attention_backward_kernel(BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = BwdSmem<T, DQK, DV, BM, BN>;
  constexpr int kWarps = BN / 16, kThreads = kWarps * 32;
  constexpr int LDQ = L::LDQ, LDV = L::LDV, LDF = L::LDF, LDT = L::LDT, LDX = L::LDX;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* cur = smem;
  T* sK = reinterpret_cast<T*>(cur);
  cur += L::kK;
  T* sV = reinterpret_cast<T*>(cur);
  cur += L::kV;
  T* sQ = reinterpret_cast<T*>(cur);
  cur += L::kQ;
  T* sDO = reinterpret_cast<T*>(cur);
  cur += L::kDO;
  float* sST = reinterpret_cast<float*>(cur);
  cur += L::kF;
  float* sDPT = reinterpret_cast<float*>(cur);
  cur += L::kF;
  T* sPT = reinterpret_cast<T*>(cur);
  cur += L::kT;
  T* sDST = reinterpret_cast<T*>(cur);
  cur += L::kT;
  float* sLse = reinterpret_cast<float*>(cur);
  float* sDelta = sLse + BM;
  cur += L::kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* sX = reinterpret_cast<float*>(cur) + warp * 16 * LDX;

  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int seq = p.seq;
  const T* kg = static_cast<const T*>(p.k.ptr) + b * p.k.sb + hk * p.k.sh;
  const T* vg = static_cast<const T*>(p.v.ptr) + b * p.v.sb + hk * p.v.sh;
  const bool* mask_row = p.mask == nullptr ? nullptr : p.mask + int64_t(b) * seq;
  load_rows<T, BN, DQK, LDQ>(sK, kg, p.k.ss, n0, seq, tid, kThreads);
  load_rows<T, BN, DV, LDV>(sV, vg, p.v.ss, n0, seq, tid, kThreads);

  Acc dk[DQK / 16], dv[DV / 16];
#pragma unroll
  for (int t = 0; t < DQK / 16; ++t) wmma::fill_fragment(dk[t], 0.f);
#pragma unroll
  for (int t = 0; t < DV / 16; ++t) wmma::fill_fragment(dv[t], 0.f);

  const int r0 = warp * 16;  // this warp's keys: n0 + r0 .. n0 + r0 + 15
  const int m_start = p.causal ? (n0 / BM) * BM : 0;
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    const T* qg = static_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh;
    const T* dog = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + h * p.dout.sh;
    const int64_t row_base = (int64_t(b) * p.hq + h) * seq;
    for (int m0 = m_start; m0 < seq; m0 += BM) {
      __syncthreads();  // the previous tile's Q, dO, dS^T are no longer read
      load_rows<T, BM, DQK, LDQ>(sQ, qg, p.q.ss, m0, seq, tid, kThreads);
      load_rows<T, BM, DV, LDV>(sDO, dog, p.dout.ss, m0, seq, tid, kThreads);
      for (int i = tid; i < BM; i += kThreads) {
        const bool in = m0 + i < seq;
        sLse[i] = in ? p.lse[row_base + m0 + i] : math::pos_inf<float>();
        sDelta[i] = in ? p.delta[row_base + m0 + i] : 0.f;
      }
      __syncthreads();

      // S^T (16 keys x BM queries) = K Q^T and dP^T = V dO^T.
#pragma unroll
      for (int it = 0; it < BM / 16; ++it) {
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        mma_k<DQK / 16, T, wmma::row_major, wmma::col_major>(acc, sK + r0 * LDQ, LDQ,
                                                             sQ + it * 16 * LDQ, LDQ);
        wmma::store_matrix_sync(sST + r0 * LDF + it * 16, acc, LDF, wmma::mem_row_major);
        wmma::fill_fragment(acc, 0.f);
        mma_k<DV / 16, T, wmma::row_major, wmma::col_major>(acc, sV + r0 * LDV, LDV,
                                                            sDO + it * 16 * LDV, LDV);
        wmma::store_matrix_sync(sDPT + r0 * LDF + it * 16, acc, LDF, wmma::mem_row_major);
      }
      __syncwarp();

      // P^T from the saved log-sum-exp, dS^T = P^T * (dP^T - D).
      for (int idx = lane; idx < 16 * BM; idx += 32) {
        const int rr = idx / BM, c = idx % BM;
        const int j = n0 + r0 + rr, i = m0 + c;
        const bool vis = j < seq && i < seq && math::key_visible(i, j, p.causal) &&
                         key_allowed(mask_row, j);
        const float pv =
            vis ? math::prob_from_lse(sST[(r0 + rr) * LDF + c] * p.scale, sLse[c]) : 0.f;
        const float ds = math::score_grad(pv, sDPT[(r0 + rr) * LDF + c], sDelta[c]);
        sPT[(r0 + rr) * LDT + c] = from_float<T>(pv);
        sDST[(r0 + rr) * LDT + c] = from_float<T>(ds);
      }
      __syncwarp();

      // dV += P^T dO, dK += dS^T Q (scaled at the end).
#pragma unroll
      for (int dt = 0; dt < DV / 16; ++dt) {
        mma_k<BM / 16, T, wmma::row_major, wmma::row_major>(dv[dt], sPT + r0 * LDT, LDT,
                                                            sDO + dt * 16, LDV);
      }
#pragma unroll
      for (int dt = 0; dt < DQK / 16; ++dt) {
        mma_k<BM / 16, T, wmma::row_major, wmma::row_major>(dk[dt], sDST + r0 * LDT, LDT,
                                                            sQ + dt * 16, LDQ);
      }
      __syncthreads();  // every warp's dS^T rows are written

      // dQ (BM x Dqk) += scale * dS K, fragments shared out among the warps.
      for (int f = warp; f < (BM / 16) * (DQK / 16); f += kWarps) {
        const int it = f / (DQK / 16), dt = f % (DQK / 16);
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        // dS (BM x BN) is dS^T read column-major.
        mma_k<BN / 16, T, wmma::col_major, wmma::row_major>(acc, sDST + it * 16, LDT,
                                                            sK + dt * 16, LDQ);
        wmma::store_matrix_sync(sX, acc, LDX, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int rr = e / 16, cc = e % 16;
          const int i = m0 + it * 16 + rr;
          if (i < seq) {
            atomicAdd(p.dq_acc + (row_base + i) * DQK + dt * 16 + cc,
                      sX[rr * LDX + cc] * p.scale);
          }
        }
        __syncwarp();
      }
    }
  }

  // Epilogue: this warp's dK (scaled) and dV rows, through the scratch tile.
  const int64_t kv_base = (int64_t(b) * p.hkv + hk) * seq;
  T* dkg = static_cast<T*>(p.dk) + kv_base * DQK;
  T* dvg = static_cast<T*>(p.dv) + kv_base * DV;
#pragma unroll
  for (int dt = 0; dt < DQK / 16; ++dt) {
    store_fragment<T>(dk[dt], sX, LDX, dkg, DQK, n0 + r0, dt * 16, seq, p.scale, lane);
  }
#pragma unroll
  for (int dt = 0; dt < DV / 16; ++dt) {
    store_fragment<T>(dv[dt], sX, LDX, dvg, DV, n0 + r0, dt * 16, seq, 1.f, lane);
  }
#else
  __trap();  // bf16/fp16 tensor-core fragments need sm_80 or newer
#endif
}

// ---- host side -----------------------------------------------------------------------------

// q/k/v/dO rows are read with 16-byte loads: unit feature stride, other strides in multiples of
// 8 elements and a 16-byte aligned start; anything else is copied to a contiguous tensor.
at::Tensor loadable(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && is_aligned(t.const_data_ptr(), 16);
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

Operand operand(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

attention::ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return attention::ElemType::kFloat16;
    case at::kBFloat16:
      return attention::ElemType::kBFloat16;
    case at::kFloat:
      return attention::ElemType::kFloat32;
    case at::kDouble:
      return attention::ElemType::kFloat64;
    default:
      return attention::ElemType::kOther;
  }
}

// The dispatch decision is stackwise/attention_dispatch.h's (tested on CPU); this only words it.
void check_cuda_support(const at::Tensor& q, const at::Tensor& v, const char* op) {
  const int64_t dqk = q.size(3), dv = v.size(3);
  const char* why = attention::cuda_unsupported_reason(elem_type(q.scalar_type()), dqk, dv);
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, op, ": ", why, "; got ", q.scalar_type(),
                              " with head dims (", dqk, ", ", dv, ")");
  TORCH_CHECK_VALUE(q.size(2) < (int64_t(1) << 31) / 2, op, ": sequence length ", q.size(2),
                    " is too long for the CUDA kernel");
}

// Calls f.template operator()<T, DQK, DV>() with (DQK, DV) = kCudaHeadDims[index]: the table is
// walked at compile time, so every entry has an instantiation and nothing else does.
template <typename T, std::size_t I = 0, typename F>
void by_head_dims(int index, F&& f) {
  if constexpr (I < attention::kNumCudaHeadDims) {
    if (index == int(I)) {
      f.template operator()<T, attention::kCudaHeadDims[I].dqk, attention::kCudaHeadDims[I].dv>();
    } else {
      by_head_dims<T, I + 1>(index, f);
    }
  }
}

// Calls f.template operator()<T, DQK, DV>() for the runtime dtype and head dims (checked by
// check_cuda_support first).
template <typename F>
void dispatch_attention(at::ScalarType dtype, int64_t dqk, int64_t dv, F&& f) {
  const int index = attention::cuda_head_dims_index(dqk, dv);
  if (dtype == at::kBFloat16) {
    by_head_dims<__nv_bfloat16>(index, f);
  } else {
    by_head_dims<__half>(index, f);
  }
}

// Opts a kernel into `bytes` of dynamic shared memory when that is within the device's limit.
template <typename K>
bool fits(K kernel, size_t bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (bytes > prop->sharedMemPerBlockOptin) return false;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
  return true;
}

// Launches the 64 x 64 tile kernel when its shared memory fits the device, else the 32 x 32 one,
// else fails saying what the device allows. launch(kernel, tile, bytes) does the launch.
template <typename KBig, typename KSmall, typename Launch>
void launch_fitting(const char* op, KBig big, size_t big_bytes, KSmall small, size_t small_bytes,
                    Launch&& launch) {
  if (fits(big, big_bytes)) {
    launch(big, 64, big_bytes);
    return;
  }
  TORCH_CHECK(fits(small, small_bytes), op, ": this device's shared memory per block (",
              at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
              " bytes) is below the ", small_bytes, " bytes the smallest tile needs");
  launch(small, 32, small_bytes);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, std::optional<double> scale) {
  constexpr const char* op = "attention_forward";
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, op);
  check_attention_scale(scale, op);
  check_device_type(q_in, at::kCUDA, op, "q");
  check_cuda_support(q_in, v_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = loadable(q_in), k = loadable(k_in), v = loadable(v_in);
  const int64_t b = q.size(0), hq = q.size(1), s = q.size(2), dv = v.size(3);
  at::Tensor out = at::empty({b, hq, s, dv}, q.options());
  at::Tensor lse = at::empty({b, hq, s}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  at::Tensor mask;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    mask = key_padding_mask->contiguous();
  }
  FwdParams p{operand(q),
              operand(k),
              operand(v),
              out.mutable_data_ptr(),
              lse.mutable_data_ptr<float>(),
              mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
              int(s),
              int(hq),
              int(hq / k.size(1)),
              float(attention_scale(scale, q.size(3))),
              causal};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_attention(q.scalar_type(), q.size(3), dv, [&]<typename T, int DQK, int DV>() {
    auto launch = [&](auto kernel, int bm, size_t bytes) {
      const dim3 grid(unsigned((s + bm - 1) / bm), unsigned(hq), unsigned(b));
      kernel<<<grid, bm / 16 * 32, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_fitting(op, attention_forward_kernel<T, DQK, DV, 64, 64>,
                   FwdSmem<T, DQK, DV, 64, 64>::bytes, attention_forward_kernel<T, DQK, DV, 32, 32>,
                   FwdSmem<T, DQK, DV, 32, 32>::bytes, launch);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, std::optional<double> scale) {
  constexpr const char* op = "attention_backward";
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, op);
  check_attention_scale(scale, op);
  check_attention_saved(grad_out, out, lse, q_in, v_in, op);
  check_device_type(q_in, at::kCUDA, op, "q");
  check_cuda_support(q_in, v_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = loadable(q_in), k = loadable(k_in), v = loadable(v_in);
  const at::Tensor dout = loadable(grad_out);
  const int64_t b = q.size(0), hq = q.size(1), hkv = k.size(1), s = q.size(2);
  const int64_t dqk = q.size(3), dv = v.size(3);
  at::Tensor dk = at::empty({b, hkv, s, dqk}, q.options());
  at::Tensor dv_out = at::empty({b, hkv, s, dv}, q.options());
  if (b * hq * s == 0) {
    return {at::zeros(q.sizes(), q.options()), dk.zero_(), dv_out.zero_()};
  }
  at::Tensor dq_acc = at::zeros({b, hq, s, dqk}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({b, hq, s}, q.options().dtype(at::kFloat));
  const at::Tensor out_c = out.contiguous(), dout_c = grad_out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    mask = key_padding_mask->contiguous();
  }
  BwdParams p{operand(q),
              operand(k),
              operand(v),
              operand(dout),
              lse_c.const_data_ptr<float>(),
              delta.const_data_ptr<float>(),
              mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
              dq_acc.mutable_data_ptr<float>(),
              dk.mutable_data_ptr(),
              dv_out.mutable_data_ptr(),
              int(s),
              int(hq),
              int(hkv),
              int(hq / hkv),
              float(attention_scale(scale, dqk)),
              causal};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_attention(q.scalar_type(), dqk, dv, [&]<typename T, int DQK, int DV>() {
    const int64_t rows = b * hq * s;
    attention_delta_kernel<T, DV><<<elementwise_blocks(rows * 32, 256), 256, 0, stream>>>(
        static_cast<const T*>(dout_c.const_data_ptr()),
        static_cast<const T*>(out_c.const_data_ptr()), delta.mutable_data_ptr<float>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto launch = [&](auto kernel, int bn, size_t bytes) {
      const dim3 grid(unsigned((s + bn - 1) / bn), unsigned(hkv), unsigned(b));
      kernel<<<grid, bn / 16 * 32, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_fitting(op, attention_backward_kernel<T, DQK, DV, 64, 64>,
                   BwdSmem<T, DQK, DV, 64, 64>::bytes,
                   attention_backward_kernel<T, DQK, DV, 32, 32>,
                   BwdSmem<T, DQK, DV, 32, 32>::bytes, launch);
  });
  return {dq_acc.to(q.scalar_type()), dk, dv_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace stackwise::cuda
