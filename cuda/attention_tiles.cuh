// Building blocks of the CUDA attention kernels (attention.cu): bf16/fp16 <-> float, the
// kernels' parameter blocks, 16-byte tile loads into shared memory, and the warp-level WMMA
// product and fragment writer every tile product goes through.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace stackwise::cuda {

namespace wmma = nvcuda::wmma;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

// Strides in elements of a [B, H, S, D] operand with unit feature stride.
struct Operand {
  const void* ptr;
  int64_t sb, sh, ss;
};

struct FwdParams {
  Operand q, k, v;
  void* out;          // [B, Hq, S, Dv] contiguous
  float* lse;         // [B, Hq, S]
  const bool* mask;   // [B, S] contiguous or null
  int seq, hq, group;  // group = Hq / Hkv
  float scale;
  bool causal;
};

struct BwdParams {
  Operand q, k, v, dout;
  const float* lse;    // [B, Hq, S]
  const float* delta;  // [B, Hq, S]: rowsum(dO * O)
  const bool* mask;
  float* dq_acc;  // [B, Hq, S, Dqk] float, zeroed
  void* dk;       // [B, Hkv, S, Dqk] contiguous
  void* dv;       // [B, Hkv, S, Dv] contiguous
  int seq, hq, hkv, group;
  float scale;
  bool causal;
};

// Copies rows [row0, row0 + ROWS) of a [S, D] operand slice into shared memory (leading
// dimension LD) with 16-byte loads; rows past the sequence are zero.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t row_stride, int row0,
                                          int seq, int tid, int nthreads) {
  constexpr int kChunks = D / 8;
  for (int idx = tid; idx < ROWS * kChunks; idx += nthreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < seq) {
      val = *reinterpret_cast<const uint4*>(src + int64_t(row0 + r) * row_stride + c * 8);
    }
    *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = val;
  }
}

__device__ __forceinline__ bool key_allowed(const bool* mask_row, int j) {
  return mask_row == nullptr || mask_row[j];
}

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc += A (16 x 16*KT) * B (16*KT x 16), operands in shared memory with leading dimensions
// lda/ldb in the given layouts; `a`/`b` point at the first 16 x 16 fragment of each.
template <int KT, typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_k(Acc& acc, const T* a, int lda, const T* b, int ldb) {
  constexpr bool a_row = std::is_same_v<LayoutA, wmma::row_major>;
  constexpr bool b_row = std::is_same_v<LayoutB, wmma::row_major>;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
    wmma::load_matrix_sync(fa, a + (a_row ? kt * 16 : kt * 16 * lda), lda);
    wmma::load_matrix_sync(fb, b + (b_row ? kt * 16 * ldb : kt * 16), ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// Writes a warp's 16 x 16 float fragment, times `scale`, to rows [row0, row0 + 16) (those below
// `seq`) and columns [col0, col0 + 16) of a row-major [seq, ld] tensor, through a scratch tile.
template <typename T>
__device__ __forceinline__ void store_fragment(const Acc& acc, float* scratch, int ld_scratch,
                                               T* dst, int64_t ld, int row0, int col0, int seq,
                                               float scale, int lane) {
  wmma::store_matrix_sync(scratch, acc, ld_scratch, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 256; e += 32) {
    const int rr = e / 16, cc = e % 16;
    if (row0 + rr < seq) {
      const float val = scratch[rr * ld_scratch + cc] * scale;
      dst[int64_t(row0 + rr) * ld + col0 + cc] = from_float<T>(val);
    }
  }
  __syncwarp();
}

}  // namespace stackwise::cuda
