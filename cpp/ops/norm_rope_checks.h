// Argument checks of RMSNorm and RoPE, shared by the CPU and CUDA dispatchers (each adds its own
// device-type check). Messages name the op and the argument (docs/DESIGN.md §6).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "checks.h"

namespace stackwise {

// RMSNorm's statistics and weight math run in x's accumulation type.
inline at::ScalarType rms_norm_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_float_tensor(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (features last), got ",
                    "a 0-d tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, op, ": x's last (feature) dimension must be non-empty, got ",
                    "shape ", x.sizes());
  check_float_tensor(weight, op, "weight");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device(), "; both must be on the same device");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op,
                    ": weight must have shape [", x.size(-1), "] (x's last dimension), got ",
                    weight.sizes());
}

// The backward's saved arguments: grad_out like x, rstd [x's leading dims] in x's acc type.
inline void check_rms_norm_saved(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& rstd, const char* op) {
  check_like(x, "x", grad_out, "grad_out", op);
  TORCH_CHECK(rstd.defined(), op, ": rstd is an undefined tensor");
  TORCH_CHECK(rstd.device() == x.device(), op, ": rstd is on ", rstd.device(), " but x is on ",
              x.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(rstd.scalar_type() == rms_norm_acc_dtype(x), op, ": rstd must have dtype ",
                   rms_norm_acc_dtype(x), " (x's accumulation type), got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.sizes() == x.sizes().slice(0, x.dim() - 1), op, ": rstd must have shape ",
                    x.sizes().slice(0, x.dim() - 1), " (x's leading dimensions), got ",
                    rstd.sizes());
}

inline void check_rope_table(const at::Tensor& t, const char* arg, const at::Tensor& q,
                             int64_t rotary_dim, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK(t.device() == q.device(), op, ": ", arg, " is on ", t.device(), " but ",
              "q is on ", q.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", arg,
                   " must be float32 (see stackwise.ops.rope_tables), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == rotary_dim / 2, op, ": ", arg,
                    " must have shape [max_positions, ", rotary_dim / 2,
                    "] (rotary_dim / 2 columns), got ", t.sizes());
}

// q_arg/k_arg name the first two arguments ("q"/"k" forward, "grad_q"/"grad_k" backward).
inline void check_rope_inputs(const at::Tensor& q, const char* q_arg, const at::Tensor& k,
                       const char* k_arg, const at::Tensor& cos, const at::Tensor& sin,
                       int64_t rotary_dim, int64_t position_offset, const char* op) {
  check_float_tensor(q, op, q_arg);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": ", q_arg, " must have shape [B, H, S, D] (4 dims), got ",
                    q.sizes());
  TORCH_CHECK(k.defined(), op, ": ", k_arg, " is an undefined tensor");
  TORCH_CHECK(k.device() == q.device(), op, ": ", k_arg, " is on ", k.device(), " but ", q_arg,
              " is on ", q.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": ", k_arg, " has dtype ",
                   k.scalar_type(), " but ", q_arg, " has dtype ", q.scalar_type(),
                   "; they must match");
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": ", k_arg, " must have shape [B, H, S, D] (4 dims), got ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
                    op, ": ", k_arg, " has shape ", k.sizes(), " but ", q_arg, " has shape ",
                    q.sizes(), "; batch (dim 0), sequence (dim 2) and head size (dim 3) must ",
                    "match (head counts may differ)");
  const int64_t d = q.size(3);
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= d, op,
                    ": rotary_dim must be even, positive and <= the head size ", d, ", got ",
                    rotary_dim);
  check_rope_table(cos, "cos", q, rotary_dim, op);
  check_rope_table(sin, "sin", q, rotary_dim, op);
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin has shape ", sin.sizes(),
                    " but cos has shape ", cos.sizes(), "; they must match");
  TORCH_CHECK_VALUE(position_offset >= 0, op, ": position_offset must be >= 0, got ",
                    position_offset);
  // Written so that no sum can overflow: offset + S <= max_positions.
  TORCH_CHECK_VALUE(q.size(2) <= cos.size(0) && position_offset <= cos.size(0) - q.size(2), op,
                    ": position_offset (",
                    position_offset, ") + sequence length (", q.size(2),
                    ") exceeds the table's max_positions (", cos.size(0), ")");
}

}  // namespace stackwise
