// Scaled dot-product attention on CPU: argument checks, allocation and the per-ISA kernel
// choice. The kernels are attention_fwd_cpu_kernel.cpp and attention_bwd_cpu_kernel.cpp; the
// shared online-softmax arithmetic and the masking conventions are in stackwise/attention_math.h.
//   attention_forward(q[B,Hq,S,Dqk], k[B,Hkv,S,Dqk], v[B,Hkv,S,Dv], key_padding_mask[B,S]?,
//                     causal, scale?) -> (out[B,Hq,S,Dv], lse[B,Hq,S])
//   attention_backward(grad_out, q, k, v, out, lse, key_padding_mask?, causal, scale?)
//                     -> (grad_q, grad_k, grad_v)
// Hq % Hkv == 0 (GQA/MQA read kv head h / (Hq / Hkv)); the mask is bool, True = attend. Inputs
// may have any strides (a unit stride on the last dimension avoids a copy); outputs are
// contiguous. lse is float32 (float64 for float64 inputs); +inf marks a fully masked row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "attention_kernels.h"
#include "cpu_alloc.h"
#include "attention_checks.h"

namespace stackwise {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Unit stride on the last dimension, which the BLAS tile products need; other strides stay.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// [B, S] of 0 (attend) / -inf (masked), added to each score row; undefined without a mask.
at::Tensor key_bias(const std::optional<at::Tensor>& mask, at::ScalarType acc) {
  if (!mask.has_value() || !mask->defined()) return {};
  at::Tensor bias = at::zeros(mask->sizes(), mask->options().dtype(acc));
  return bias.masked_fill_(mask->logical_not(), -std::numeric_limits<double>::infinity());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool causal,
    std::optional<double> scale) {
  const char* op = "attention_forward";
  check_attention_inputs(q, k, v, key_padding_mask, op);
  check_attention_scale(scale, op);
  check_device_type(q, at::kCPU, op, "q");
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dv = v.size(3);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  at::Tensor out = cpu::empty_output({B, Hq, S, Dv}, q.options());
  at::Tensor lse = cpu::empty_output({B, Hq, S}, q.options().dtype(acc));
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    out.zero_();
    return {out, lse};
  }
  const at::Tensor qc = unit_last_stride(q), kc = unit_last_stride(k), vc = unit_last_stride(v);
  STACKWISE_CPU_DISPATCH(attention_forward_kernel, qc, kc, vc, key_bias(key_padding_mask, acc),
                         causal, attention_scale(scale, q.size(3)), out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, std::optional<double> scale) {
  const char* op = "attention_backward";
  check_attention_inputs(q, k, v, key_padding_mask, op);
  check_attention_scale(scale, op);
  check_device_type(q, at::kCPU, op, "q");
  check_attention_saved(grad_out, out, lse, q, v, op);
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), Dqk = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  at::Tensor grad_q = cpu::empty_output({B, Hq, S, Dqk}, q.options());
  // Per-query-head dK/dV accumulators, summed over each GQA group below. For fp32/fp64 MHA they
  // are the outputs themselves.
  const bool direct = Hq == Hkv && q.scalar_type() == acc;
  at::Tensor dk_acc = at::zeros({B, Hq, S, Dqk}, q.options().dtype(acc));
  at::Tensor dv_acc = at::zeros({B, Hq, S, Dv}, q.options().dtype(acc));
  if (grad_q.numel() > 0 && dv_acc.numel() > 0) {
    STACKWISE_CPU_DISPATCH(attention_backward_kernel, unit_last_stride(grad_out),
                           unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                           unit_last_stride(out), lse.contiguous(),
                           key_bias(key_padding_mask, acc), causal,
                           attention_scale(scale, Dqk), grad_q, dk_acc, dv_acc);
  } else {
    grad_q.zero_();
  }
  if (direct) return {grad_q, dk_acc, dv_acc};
  // Fixed-order sum over the group's query heads: deterministic.
  const int64_t group = Hq / Hkv;
  at::Tensor grad_k = dk_acc.view({B, Hkv, group, S, Dqk}).sum(2).to(q.scalar_type());
  at::Tensor grad_v = dv_acc.view({B, Hkv, group, S, Dv}).sum(2).to(q.scalar_type());
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace stackwise
