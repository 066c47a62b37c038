// Tile matrix products for the CPU attention kernels, at BLAS speed.
//
// Column-major BLAS convention: C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, with
// leading dimensions lda/ldb/ldc. A row-major tile X[r,c] with row stride ld is the column-major
// matrix X^T with leading dimension ld, which is how the kernels pass their row-major tiles.
//
// Why not at::native::cpublas::gemm: its fp32/fp64/bf16 overloads (the ones that reach MKL and
// oneDNN) are not exported by libtorch_cpu (checked with `nm -D` on torch 2.14.1); only the
// generic template through gemm_stub is, which runs ATen's scalar fallback. libtorch_cpu does
// export the BLAS it was linked with (sgemm_/dgemm_, and on MKL builds cblas_gemm_bf16bf16f32 /
// cblas_gemm_f16f16f32), so we call those, resolved at load time through weak references. Where a
// symbol is missing (a torch build without it) the product falls back to a plain loop (fp32/fp64;
// ATen's generic gemm template is not linkable either) or to widening the tile to fp32
// (bf16/fp16): correct, slower.
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
