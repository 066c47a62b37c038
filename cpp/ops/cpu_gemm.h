// Tile matrix products for the CPU kernels (attention, linear attention), at BLAS speed. The one
// BLAS wrapper of the project: every CPU kernel that multiplies tiles inside its own parallel
// loop calls these.
//
// Column-major BLAS convention: C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, with
// leading dimensions lda/ldb/ldc. A row-major tile X[r,c] with row stride ld is the column-major
// matrix X^T with leading dimension ld, which is how the kernels pass their row-major tiles.
// beta == 0 ignores what C held (NaN included), as BLAS does. m, n or k may be 0.
//
// Why not at::native::cpublas::gemm: its fp32/fp64/bf16 overloads (the ones that reach MKL and
// oneDNN) are not exported by libtorch_cpu (checked with `nm -D` on torch 2.14.1); only the
// generic template through gemm_stub is, which runs ATen's scalar fallback. And at::mm costs a
// dispatcher round trip (~5 us) per tile. libtorch_cpu does export the BLAS it was linked with
// (sgemm_/dgemm_, LP64, the interface ATen itself calls; on MKL builds also
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32), so we call those, resolved at load time through
// weak references. Where a symbol is missing (a torch build without it), or the environment sets
// STACKWISE_DIRECT_BLAS=0 (read once per process; the tests use it to cover this path), fp32/fp64
// products go through at::mm on views of the tiles and bf16/fp16 tiles are widened to fp32 first:
// correct, slower. Called from inside at::parallel_for, MKL and at::mm run single-threaded.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace stackwise::cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);
// Reduced-precision operands, fp32 accumulation and output.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta,
          float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// Row-major convenience: C[m,n] (ldc) = op(A)[m,k] (lda) op(B)[k,n] (ldb) + beta C, alpha = 1,
// through the column-major call above (C^T = op(B)^T op(A)^T).
template <typename T>
inline void gemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                           const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                           int64_t ldc) {
  gemm(trans_b, trans_a, n, m, k, T(1), b, ldb, a, lda, beta, c, ldc);
}

// Tile products on packed operands through oneDNN's brgemm micro-kernel (AMX on CPUs that have
// it), reached through at::native::cpublas::brgemm/could_pack, which libtorch_cpu exports.
// Row-major convention: C[m, n] (ldc) = A[m, k] (lda) * B[k, n] (+ C when add_c), where B is
// packed in the VNNI layout [k / 2, ldb, 2] (element (r, c) at ((r / 2) * ldb + c) * 2 + r % 2;
// k even). vnni_gemm_available(dtype) says whether the running torch and CPU support it (false,
// for example, without oneDNN's micro-kernel API, without AMX/AVX512-FP16, or with
// torch.backends.mkldnn disabled); callers then take the gemm() path above. A thread that ran
// vnni_gemm calls vnni_gemm_release() before it leaves its parallel region, which releases the
// AMX tile state.
bool vnni_gemm_available(c10::ScalarType dtype);
void vnni_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
               const c10::BFloat16* a, const c10::BFloat16* b, float* c);
void vnni_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
               const c10::Half* a, const c10::Half* b, float* c);
void vnni_gemm_release();

}  // namespace stackwise::cpu
