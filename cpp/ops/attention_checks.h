// Argument checks of the attention ops, shared by the CPU and CUDA dispatchers. Messages name
// the op and the argument and say what was expected:
//   q [B, Hq, S, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv], Hq % Hkv == 0,
//   key_padding_mask [B, S] bool (True = attend), all on one device, q/k/v of one float dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"

namespace stackwise {

inline void check_rank4(const at::Tensor& t, const char* op, const char* arg, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", arg, " must be 4-D ", dims, ", got shape ",
                    t.sizes());
}

inline void check_same_device_dtype(const at::Tensor& ref, const char* ref_arg,
                                    const at::Tensor& other, const char* other_arg,
                                    const char* op) {
  TORCH_CHECK(other.defined(), op, ": ", other_arg, " is an undefined tensor");
  TORCH_CHECK(other.device() == ref.device(), op, ": ", other_arg, " is on ", other.device(),
              " but ", ref_arg, " is on ", ref.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), op, ": ", other_arg, " has dtype ",
                   other.scalar_type(), " but ", ref_arg, " has dtype ", ref.scalar_type(),
                   "; they must match");
}

inline void check_dim(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                      const char* arg, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", arg, " has ", what, " ", t.size(dim),
                    " at dim ", dim, " but expected ", expected, " (shape ", t.sizes(), ")");
}

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& mask, const char* op) {
  check_float_tensor(q, op, "q");
  check_same_device_dtype(q, "q", k, "k", op);
  check_same_device_dtype(q, "q", v, "v", op);
  check_rank4(q, op, "q", "[B, Hq, S, Dqk]");
  check_rank4(k, op, "k", "[B, Hkv, S, Dqk]");
  check_rank4(v, op, "v", "[B, Hkv, S, Dv]");
  check_dim(k, 0, q.size(0), op, "k", "batch size");
  check_dim(v, 0, q.size(0), op, "v", "batch size");
  check_dim(k, 2, q.size(2), op, "k", "sequence length");
  check_dim(v, 2, q.size(2), op, "v", "sequence length");
  check_dim(k, 3, q.size(3), op, "k", "head dim");
  TORCH_CHECK_VALUE(q.size(3) > 0, op, ": q's head dim (Dqk, dim 3) must be >= 1, got shape ",
                    q.sizes());
  check_dim(v, 1, k.size(1), op, "v", "kv head count");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q has ", q.size(1),
                    " heads, which must be a multiple of k's ", k.size(1),
                    " heads (Hq % Hkv == 0)");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == q.device(), op, ": key_padding_mask is on ", m.device(),
                " but q is on ", q.device(), "; both must be on the same device");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op,
                     ": key_padding_mask must be bool (True = attend), got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(2), op,
                      ": key_padding_mask must have shape [B, S] = [", q.size(0), ", ",
                      q.size(2), "], got ", m.sizes());
  }
}

// grad_out and out are [B, Hq, S, Dv] like the forward's output, lse [B, Hq, S].
inline void check_attention_saved(const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& q,
                                  const at::Tensor& v, const char* op) {
  check_same_device_dtype(q, "q", grad_out, "grad_out", op);
  check_same_device_dtype(q, "q", out, "out", op);
  const std::vector<int64_t> o_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(o_shape), op, ": grad_out has shape ",
                    grad_out.sizes(), " but expected ", at::IntArrayRef(o_shape));
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(o_shape), op, ": out has shape ",
                    out.sizes(), " but expected ", at::IntArrayRef(o_shape));
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ",
              q.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, op, ": lse must be ", acc, ", got ",
                   lse.scalar_type());
  const std::vector<int64_t> l_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(l_shape), op, ": lse has shape ", lse.sizes(),
                    " but expected ", at::IntArrayRef(l_shape));
}

// The softmax scale: the given one (finite), else 1/sqrt(Dqk).
inline void check_attention_scale(std::optional<double> scale, const char* op) {
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), op,
                    ": scale must be a finite number (or None for 1/sqrt(Dqk)), got ", *scale);
}

inline double attention_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) return *scale;
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

}  // namespace stackwise
