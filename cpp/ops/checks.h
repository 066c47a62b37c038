// Argument checks shared by every op (CPU and CUDA). Each check names the op and the argument,
// says what was expected and what was received, and throws through TORCH_CHECK, which reaches
// Python as a RuntimeError (ValueError/TypeError subclasses are chosen where torch has them).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace stackwise {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The tensor exists and holds float32, float64, float16 or bfloat16.
inline void check_float_tensor(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", arg,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// `other` has the same shape, dtype and device as `ref`.
inline void check_like(const at::Tensor& ref, const char* ref_arg, const at::Tensor& other,
                       const char* other_arg, const char* op) {
  TORCH_CHECK(other.defined(), op, ": ", other_arg, " is an undefined tensor");
  TORCH_CHECK(other.device() == ref.device(), op, ": ", other_arg, " is on ", other.device(),
              " but ", ref_arg, " is on ", ref.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), op, ": ", other_arg, " has dtype ",
                   other.scalar_type(), " but ", ref_arg, " has dtype ", ref.scalar_type(),
                   "; they must match");
  TORCH_CHECK_VALUE(other.sizes() == ref.sizes(), op, ": ", other_arg, " has shape ", other.sizes(),
                    " but ", ref_arg, " has shape ", ref.sizes(), "; they must match");
}

inline void check_device_type(const at::Tensor& t, at::DeviceType type, const char* op,
                              const char* arg) {
  TORCH_CHECK(t.device().type() == type, op, ": ", arg, " must be a ", type, " tensor, got ",
              t.device());
}

// a * b for sizes given as arguments (not read from a tensor, which torch keeps in range):
// both must be >= 0 and the product must fit in int64, else the op fails naming `what`.
inline int64_t checked_size_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK_VALUE(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " (",
                    a, " x ", b, ") is negative or does not fit in a 64-bit size");
  return r;
}

// The element count of a shape given as an argument, overflow-checked.
inline int64_t checked_numel(at::IntArrayRef shape, const char* op, const char* arg) {
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": ", arg, " has a negative size: ", shape);
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(n, s, &n), op, ": ", arg, " ", shape,
                      " has more elements than fit in a 64-bit size");
  }
  return n;
}

}  // namespace stackwise
