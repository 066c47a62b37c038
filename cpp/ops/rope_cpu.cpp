// RoPE on CPU: argument checks, allocation and the per-ISA kernel choice. The math lives in
// rope_cpu_kernel.cpp (vectorized loops) and stackwise/rope_math.h (scalar form, pairing).
//   rope(q[B,Hq,S,D], k[B,Hk,S,D], cos[P,R/2], sin[P,R/2], R, offset) -> (q_out, k_out)
//   rope_backward(grad_q, grad_k, cos, sin, R, offset) -> (grad_q_in, grad_k_in)
// Token s uses table row offset + s (offset + S <= P). Features >= R pass through. q and k may
// have different head counts (GQA) and any strides over B, H, S (a non-unit feature stride is
// made contiguous); outputs are contiguous. cos/sin are float32 for every q dtype.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_alloc.h"
#include "norm_rope_kernels.h"
#include "stackwise/checks.h"

namespace stackwise {
namespace {

void check_table(const at::Tensor& t, const char* arg, const at::Tensor& q, int64_t rotary_dim,
                 const char* op) {
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
void check_rope_inputs(const at::Tensor& q, const char* q_arg, const at::Tensor& k,
                       const char* k_arg, const at::Tensor& cos, const at::Tensor& sin,
                       int64_t rotary_dim, int64_t position_offset, const char* op) {
  check_float_tensor(q, op, q_arg);
  check_device_type(q, at::kCPU, op, q_arg);
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
  check_table(cos, "cos", q, rotary_dim, op);
  check_table(sin, "sin", q, rotary_dim, op);
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin has shape ", sin.sizes(),
                    " but cos has shape ", cos.sizes(), "; they must match");
  TORCH_CHECK_VALUE(position_offset >= 0, op, ": position_offset must be >= 0, got ",
                    position_offset);
  TORCH_CHECK_VALUE(position_offset + q.size(2) <= cos.size(0), op, ": position_offset (",
                    position_offset, ") + sequence length (", q.size(2),
                    ") exceeds the table's max_positions (", cos.size(0), ")");
}

at::Tensor unit_feature_stride(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              int64_t rotary_dim, int64_t position_offset,
                                              bool inverse) {
  const at::Tensor qc = unit_feature_stride(q);
  const at::Tensor kc = unit_feature_stride(k);
  at::Tensor out_q = cpu::empty_output(q.sizes(), q.options());
  at::Tensor out_k = cpu::empty_output(k.sizes(), k.options());
  if (q.numel() + k.numel() > 0) {
    STACKWISE_CPU_DISPATCH(rope_kernel, qc, kc, cos.contiguous(), sin.contiguous(), rotary_dim,
                           position_offset, inverse, out_q, out_k);
  }
  return {out_q, out_k};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            int64_t rotary_dim, int64_t position_offset) {
  check_rope_inputs(q, "q", k, "k", cos, sin, rotary_dim, position_offset, "rope");
  return rope_apply(q, k, cos, sin, rotary_dim, position_offset, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q,
                                                     const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     int64_t rotary_dim,
                                                     int64_t position_offset) {
  check_rope_inputs(grad_q, "grad_q", grad_k, "grad_k", cos, sin, rotary_dim, position_offset,
                    "rope_backward");
  return rope_apply(grad_q, grad_k, cos, sin, rotary_dim, position_offset, /*inverse=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}

}  // namespace stackwise
