// Direct BLAS GEMM for CPU kernels that multiply small tiles inside their own parallel loop.
//
// at::native::cpublas::gemm is the obvious call but its float/double overloads are not exported
// from libtorch_cpu (hidden visibility; linking fails), and at::mm costs a dispatcher round trip
// (~5 us) per tile. x86 wheels of torch link MKL statically and export the Fortran symbols
// sgemm_/dgemm_ (LP64, 32-bit ints: the interface ATen itself calls), so they are declared weak
// here: where a libtorch lacks them the pointer is null and callers fall back to at::mm. Setting
// STACKWISE_DIRECT_BLAS=0 in the environment forces that fallback (the tests cover it so).
// Called from inside at::parallel_for, MKL runs single-threaded (nested OpenMP region).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace stackwise::blas {

inline bool direct_blas_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("STACKWISE_DIRECT_BLAS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return allowed;
}

template <typename T>
inline bool has_gemm() {
  if constexpr (sizeof(T) == sizeof(double)) {
    return &dgemm_ != nullptr && direct_blas_allowed();
  } else {
    return &sgemm_ != nullptr && direct_blas_allowed();
  }
}

// Column-major C[m,n] = op(A) op(B) + beta C (alpha = 1). Sizes fit in int (tiles of a kernel).
inline void gemm_col_major(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                           int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                           int64_t ldc) {
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ila = int(lda), ilb = int(ldb), ilc = int(ldc);
  const float one = 1.0f;
  sgemm_(&cta, &ctb, &im, &in, &ik, &one, a, &ila, b, &ilb, &beta, c, &ilc);
}

inline void gemm_col_major(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a,
                           int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                           int64_t ldc) {
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ila = int(lda), ilb = int(ldb), ilc = int(ldc);
  const double one = 1.0;
  dgemm_(&cta, &ctb, &im, &in, &ik, &one, a, &ila, b, &ilb, &beta, c, &ilc);
}

}  // namespace stackwise::blas
