// Tile matrix products through the BLAS that libtorch_cpu exports (see cpu_gemm.h for why).
#include "cpu_gemm.h"

#include "blas_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <vector>

// sgemm_/dgemm_ are declared (weak) in blas_gemm.h, shared with the linear-attention kernels.
// Weak references: null when the loaded libtorch_cpu does not export the symbol.
extern "C" {
// MKL's CBLAS (LP64): layout 102 = column major, transposes 111 = no, 112 = yes.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace stackwise::cpu {
namespace {

constexpr int kColMajor = 102;
inline int cblas_trans(bool t) { return t ? 112 : 111; }

// Plain column-major product, for a libtorch without an exported BLAS (correct, not fast).
template <typename T>
void gemm_naive(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = ta ? a[i * lda + p] : a[p * lda + i];
        const T bv = tb ? b[p * ldb + j] : b[j * ldb + p];
        sum += av * bv;
      }
      T& cij = c[j * ldc + i];
      cij = alpha * sum + (beta == T(0) ? T(0) : beta * cij);
    }
  }
}

inline int i32(int64_t x) {
  TORCH_CHECK(x <= INT32_MAX, "stackwise::cpu::gemm: dimension ", x, " exceeds the BLAS int range");
  return static_cast<int>(x);
}

// Widen a column-major (rows x cols, leading dimension ld) reduced-precision matrix to fp32.
template <typename T>
void widen(const T* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * rows + r] = static_cast<float>(src[c * ld + r]);
  }
}

template <typename T>
void gemm_widened(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> wa, wb;
  // Stored shapes of A and B (before op()).
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  widen(a, a_rows, a_cols, lda, wa);
  widen(b, b_rows, b_cols, ldb, wb);
  gemm(ta, tb, m, n, k, alpha, wa.data(), a_rows, wb.data(), b_rows, beta, c, ldc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int mi = i32(m), ni = i32(n), ki = i32(k), la = i32(lda), lb = i32(ldb), lc = i32(ldc);
    sgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  gemm_naive<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ != nullptr) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int mi = i32(m), ni = i32(n), ki = i32(k), la = i32(lda), lb = i32(ldb), lc = i32(ldc);
    dgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  gemm_naive<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_bf16bf16f32 != nullptr) {
    cblas_gemm_bf16bf16f32(kColMajor, cblas_trans(ta), cblas_trans(tb), i32(m), i32(n), i32(k),
                           alpha, reinterpret_cast<const uint16_t*>(a), i32(lda),
                           reinterpret_cast<const uint16_t*>(b), i32(ldb), beta, c, i32(ldc));
    return;
  }
  gemm_widened(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
          int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (cblas_gemm_f16f16f32 != nullptr) {
    cblas_gemm_f16f16f32(kColMajor, cblas_trans(ta), cblas_trans(tb), i32(m), i32(n), i32(k),
                         alpha, reinterpret_cast<const uint16_t*>(a), i32(lda),
                         reinterpret_cast<const uint16_t*>(b), i32(ldb), beta, c, i32(ldc));
    return;
  }
  gemm_widened(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool vnni_gemm_available(c10::ScalarType dtype) {
  return (dtype == c10::kBFloat16 || dtype == c10::kHalf) &&
         at::native::cpublas::could_pack(dtype);
}

void vnni_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
               const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/true);
}

void vnni_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
               const c10::Half* a, const c10::Half* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/true);
}

void vnni_gemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace stackwise::cpu
