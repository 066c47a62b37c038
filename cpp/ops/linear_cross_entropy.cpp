// Linear cross-entropy, device-independent part: argument checks, the chunked driver (GEMMs
// through ATen, so cuBLAS on CUDA and the CPU BLAS on CPU) and the three ops built on it; and
// the CPU registration. The row kernels are in linear_cross_entropy_cpu_kernel.cpp and
// cuda/linear_cross_entropy.cu; the shared math in stackwise/linear_cross_entropy_math.h.
//
//   linear_cross_entropy_forward(hidden [N,d], weight [V,d], bias [V]?, labels [N]) ->
//       (losses [N], predictions [N])            per-token losses, no gradient kept
//   linear_cross_entropy_backward(grad_losses [N], ...) -> (grad_hidden, grad_weight, grad_bias)
//       recomputes the logits chunk by chunk (reduction "none" and second uses)
//   linear_cross_entropy_fused(..., reduction) -> (loss [], grad_hidden, grad_weight, grad_bias)
//       mean/sum loss with its gradients computed in the same pass (3 GEMMs instead of the 4 a
//       recomputing backward needs; the autograd backward only scales them)
// Losses are in the accumulation dtype (float32, float64 for float64 inputs); gradients in the
// dtype of what they differentiate. grad_bias is an empty [0] tensor when there is no bias.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "linear_cross_entropy.h"
#include "checks.h"
#include "stackwise/linear_cross_entropy_math.h"

namespace stackwise::lce {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                  const Options& opt, at::DeviceType device, const char* op) {
  check_float_tensor(hidden, op, "hidden");
  check_device_type(hidden, device, op, "hidden");
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be [N, d] (2-D), got shape ",
                    hidden.sizes());
  check_float_tensor(weight, op, "weight");
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ",
                   weight.scalar_type(), " but hidden has dtype ", hidden.scalar_type(),
                   "; they must match (cast the weight to the hidden dtype)");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), op,
                    ": weight must be [V, d] with d = hidden.size(1) = ", hidden.size(1),
                    ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight has no rows (vocabulary of size 0)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == hidden.device(), op, ": bias is on ", bias->device(),
                " but hidden is on ", hidden.device(), "; both must be on the same device");
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), op, ": bias has dtype ",
                     bias->scalar_type(), " but hidden has dtype ", hidden.scalar_type(),
                     "; they must match");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must be [V] with V = weight.size(0) = ", weight.size(0),
                      ", got shape ", bias->sizes());
  }
  TORCH_CHECK(labels.defined(), op, ": labels is an undefined tensor");
  TORCH_CHECK(labels.device() == hidden.device(), op, ": labels is on ", labels.device(),
              " but hidden is on ", hidden.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
                    ": labels must be [N] with N = hidden.size(0) = ", hidden.size(0),
                    ", got shape ", labels.sizes());
  TORCH_CHECK_VALUE(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", opt.label_smoothing);
  TORCH_CHECK_VALUE(opt.z_loss >= 0.0 && std::isfinite(opt.z_loss), op,
                    ": z_loss must be a finite value >= 0, got ", opt.z_loss);
  if (labels.numel() > 0) {
    // One host read (a device sync on CUDA): an out-of-range label would index past the row.
    const int64_t vocab = weight.size(0);
    const at::Tensor bad = ((labels < 0) | (labels >= vocab)) & (labels != opt.ignore_index);
    if (bad.any().item<bool>()) {
      const at::Tensor where = bad.nonzero().select(1, 0);
      const int64_t i = where[0].item<int64_t>();
      TORCH_CHECK_VALUE(false, op, ": labels[", i, "] = ", labels[i].item<int64_t>(),
                        " is outside [0, ", vocab, ") and is not ignore_index (",
                        opt.ignore_index, ")");
    }
  }
}

Result run(const at::Tensor& hidden_in, const at::Tensor& weight_in,
           const c10::optional<at::Tensor>& bias_in, const at::Tensor& labels_in,
           const Options& opt, const at::Tensor& row_scale, bool weight_grad,
           bool want_predictions, RowKernel kernel, int64_t budget_elems, int64_t min_rows) {
  const at::ScalarType acc = acc_dtype(hidden_in.scalar_type());
  const int64_t n = hidden_in.size(0);
  const int64_t d = hidden_in.size(1);
  const int64_t vocab = weight_in.size(0);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool want_grad = row_scale.defined();
  weight_grad = weight_grad && want_grad;
  const at::TensorOptions acc_opts = hidden_in.options().dtype(acc);

  // The weight in the accumulation dtype once (a no-op for float32/float64): every GEMM then
  // accumulates in float32 for bf16/fp16 inputs.
  const at::Tensor weight = weight_in.to(acc).contiguous();
  const at::Tensor bias = has_bias ? bias_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();

  Result r;
  r.losses = at::empty({n}, acc_opts);
  r.predictions = want_predictions ? at::empty({n}, labels.options()) : at::Tensor();
  at::Tensor grad_w_acc, grad_b_acc;
  if (want_grad) {
    r.grad_hidden = at::empty({n, d}, hidden.options());
    if (weight_grad) grad_w_acc = at::zeros({vocab, d}, acc_opts);
    if (weight_grad && has_bias) grad_b_acc = at::zeros({vocab}, acc_opts);
  }
  const int64_t rows = math::lce_rows_per_chunk(n, vocab, budget_elems, min_rows, 8);
  if (n > 0) {
    at::Tensor buffer = at::empty({rows, vocab}, acc_opts);
    const bool same_dtype = hidden.scalar_type() == acc;
    at::Tensor gh_buffer =
        (want_grad && !same_dtype) ? at::empty({rows, d}, acc_opts) : at::Tensor();
    const int64_t chunks = math::lce_num_chunks(n, rows);
    for (int64_t c = 0; c < chunks; ++c) {
      const math::LceRange rg = math::lce_chunk(c, rows, n);
      const int64_t len = rg.end - rg.begin;
      const at::Tensor h = hidden.narrow(0, rg.begin, len).to(acc);
      at::Tensor logits = buffer.narrow(0, 0, len);
      if (has_bias) {
        at::addmm_out(logits, bias, h, weight.t());
      } else {
        at::mm_out(logits, h, weight.t());
      }
      at::Tensor losses = r.losses.narrow(0, rg.begin, len);
      at::Tensor preds = want_predictions ? r.predictions.narrow(0, rg.begin, len) : at::Tensor();
      const at::Tensor scale = want_grad ? row_scale.narrow(0, rg.begin, len) : at::Tensor();
      kernel(logits, labels.narrow(0, rg.begin, len), losses, preds, scale, opt);
      if (!want_grad) continue;
      if (same_dtype) {
        at::Tensor gh = r.grad_hidden.narrow(0, rg.begin, len);
        at::mm_out(gh, logits, weight);
      } else {
        at::Tensor gh = gh_buffer.narrow(0, 0, len);
        at::mm_out(gh, logits, weight);
        r.grad_hidden.narrow(0, rg.begin, len).copy_(gh);
      }
      if (!weight_grad) continue;
      grad_w_acc.addmm_(logits.t(), h);
      if (has_bias) grad_b_acc.add_(logits.sum(0));
    }
  }
  if (want_grad) {
    r.grad_weight = weight_grad ? grad_w_acc.to(weight_in.scalar_type())
                                : at::empty({0}, weight_in.options());
    r.grad_bias = (weight_grad && has_bias) ? grad_b_acc.to(bias_in->scalar_type())
                                            : at::empty({0}, hidden.options());
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& hidden, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const at::Tensor& labels, int64_t ignore_index,
                                              double label_smoothing, double z_loss,
                                              at::DeviceType device, RowKernel kernel,
                                              int64_t budget_elems, int64_t min_rows) {
  const Options opt{ignore_index, label_smoothing, z_loss};
  check_inputs(hidden, weight, bias, labels, opt, device, "linear_cross_entropy_forward");
  Result r = run(hidden, weight, bias, labels, opt, at::Tensor(), false, /*want_predictions=*/true,
                 kernel, budget_elems, min_rows);
  return {r.losses, r.predictions};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_losses, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    double label_smoothing, double z_loss, bool weight_grad, at::DeviceType device,
    RowKernel kernel, int64_t budget_elems, int64_t min_rows) {
  const char* op = "linear_cross_entropy_backward";
  const Options opt{ignore_index, label_smoothing, z_loss};
  check_inputs(hidden, weight, bias, labels, opt, device, op);
  TORCH_CHECK(grad_losses.defined(), op, ": grad_losses is an undefined tensor");
  TORCH_CHECK(grad_losses.device() == hidden.device(), op, ": grad_losses is on ",
              grad_losses.device(), " but hidden is on ", hidden.device());
  check_float_tensor(grad_losses, op, "grad_losses");
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == hidden.size(0), op,
                    ": grad_losses must be [N] with N = hidden.size(0) = ", hidden.size(0),
                    ", got shape ", grad_losses.sizes());
  const at::Tensor scale = grad_losses.to(acc_dtype(hidden.scalar_type()));
  Result r = run(hidden, weight, bias, labels, opt, scale, weight_grad,
                 /*want_predictions=*/false, kernel, budget_elems, min_rows);
  return {r.grad_hidden, r.grad_weight, r.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_op(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, double z_loss,
    c10::string_view reduction, bool weight_grad, at::DeviceType device, RowKernel kernel,
    int64_t budget_elems, int64_t min_rows) {
  const char* op = "linear_cross_entropy_fused";
  const Options opt{ignore_index, label_smoothing, z_loss};
  check_inputs(hidden, weight, bias, labels, opt, device, op);
  const bool mean = reduction == "mean";
  TORCH_CHECK_VALUE(mean || reduction == "sum", op, ": reduction must be 'mean' or 'sum', got '",
                    std::string(reduction), "' (per-token losses: linear_cross_entropy_forward)");
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const int64_t n = hidden.size(0);
  // Mean over the tokens that carry a label; a batch with none has loss 0 and zero gradients.
  // The count stays on the device (no sync): the scale is a 0-dim tensor broadcast to [N].
  at::Tensor inv = at::ones({}, hidden.options().dtype(acc));
  if (mean) inv = 1.0 / (labels != ignore_index).sum().to(acc).clamp_min(1.0);
  Result r = run(hidden, weight, bias, labels, opt, inv.expand({n}), weight_grad,
                 /*want_predictions=*/false, kernel, budget_elems, min_rows);
  at::Tensor loss = r.losses.sum();
  if (mean) loss = loss * inv;
  return {loss, r.grad_hidden, r.grad_weight, r.grad_bias};
}

}  // namespace stackwise::lce

namespace stackwise {
namespace {

using lce::RowKernel;

// CPU buffer: 256K logits (1 MiB in float32, inside L2) but at least 128 token rows, so the
// GEMMs against a [V, d] weight stay compute-bound at large vocabularies (each chunk re-reads
// the weight: 128 rows make that d/128 of the logits traffic).
constexpr int64_t kCpuBudget = 1 << 18;
constexpr int64_t kCpuMinRows = 128;

void cpu_rows(at::Tensor& logits, const at::Tensor& labels, at::Tensor& losses, at::Tensor& preds,
              const at::Tensor& scale, const lce::Options& opt) {
  STACKWISE_CPU_DISPATCH(lce_rows_kernel, logits, labels, losses, preds, scale, opt);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias,
                                               const at::Tensor& labels, int64_t ignore_index,
                                               double label_smoothing, double z_loss) {
  return lce::forward_op(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                         at::kCPU, &cpu_rows, kCpuBudget, kCpuMinRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    double label_smoothing, double z_loss, bool weight_grad) {
  return lce::backward_op(grad_losses, hidden, weight, bias, labels, ignore_index,
                          label_smoothing, z_loss, weight_grad, at::kCPU, &cpu_rows, kCpuBudget, kCpuMinRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, double z_loss,
    c10::string_view reduction, bool weight_grad) {
  return lce::fused_op(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                       reduction, weight_grad, at::kCPU, &cpu_rows, kCpuBudget, kCpuMinRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("linear_cross_entropy_forward", &forward_cpu);
  m.impl("linear_cross_entropy_backward", &backward_cpu);
  m.impl("linear_cross_entropy_fused", &fused_cpu);
}

}  // namespace stackwise
