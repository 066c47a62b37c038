// Tile matrix products through the BLAS that libtorch_cpu exports, with an at::mm fallback
// (see cpu_gemm.h for why and when each path runs).
#include "cpu_gemm.h"

#include <ATen/Functions.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <vector>

// Weak references: null when the loaded libtorch_cpu does not export the symbol.
extern "C" {
// Fortran BLAS (LP64: 32-bit ints), column major.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
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

// STACKWISE_DIRECT_BLAS=0 forces the fallback paths (read once per process).
bool direct_blas_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("STACKWISE_DIRECT_BLAS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return allowed;
}

inline int i32(int64_t x) {
  TORCH_CHECK(x <= INT32_MAX, "stackwise::cpu::gemm: dimension ", x, " exceeds the BLAS int range");
  return static_cast<int>(x);
}

// The degenerate shapes BLAS implementations disagree on (lda >= max(1, rows) checks): nothing to
// do for an empty C; C = beta C for an empty sum. True when handled.
template <typename T>
bool gemm_degenerate(int64_t m, int64_t n, int64_t k, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return true;
  if (k != 0) return false;
  for (int64_t j = 0; j < n; ++j) {
    T* cj = c + j * ldc;
    for (int64_t i = 0; i < m; ++i) cj[i] = beta == T(0) ? T(0) : beta * cj[i];
  }
  return true;
}

// The column-major product through ATen on views of the tiles. A column-major rows x cols matrix
// with leading dimension ld is the transpose of a row-major [cols, rows] tensor with row stride ld.
template <typename T>
void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto col_major = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t();
  };
  const at::Tensor av = ta ? col_major(a, k, m, lda).t() : col_major(a, m, k, lda);
  const at::Tensor bv = tb ? col_major(b, n, k, ldb).t() : col_major(b, k, n, ldb);
  at::Tensor cv = col_major(c, m, n, ldc);
  at::Tensor prod = at::mm(av, bv);
  if (alpha != T(1)) prod.mul_(alpha);
  if (beta == T(0)) {
    cv.copy_(prod);
  } else {
    cv.mul_(beta).add_(prod);
  }
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
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
  if (sgemm_ != nullptr && direct_blas_allowed()) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int mi = i32(m), ni = i32(n), ki = i32(k), la = i32(lda), lb = i32(ldb), lc = i32(ldc);
    sgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  gemm_aten<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
  if (dgemm_ != nullptr && direct_blas_allowed()) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int mi = i32(m), ni = i32(n), ki = i32(k), la = i32(lda), lb = i32(ldb), lc = i32(ldc);
    dgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  gemm_aten<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
  if (cblas_gemm_bf16bf16f32 != nullptr && direct_blas_allowed()) {
    cblas_gemm_bf16bf16f32(kColMajor, cblas_trans(ta), cblas_trans(tb), i32(m), i32(n), i32(k),
                           alpha, reinterpret_cast<const uint16_t*>(a), i32(lda),
                           reinterpret_cast<const uint16_t*>(b), i32(ldb), beta, c, i32(ldc));
    return;
  }
  gemm_widened(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
          int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
  if (cblas_gemm_f16f16f32 != nullptr && direct_blas_allowed()) {
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
