// Linear cross-entropy: the device-independent driver and the per-device row kernels.
//
//   losses[n] = CE(W h_n + b, y_n) (label smoothing, z-loss; 0 where y_n == ignore_index)
//
// The driver (linear_cross_entropy.cpp) walks the tokens in chunks: per chunk one GEMM gives the
// logits [rows, V] in the accumulation dtype (float for float/bf16/fp16, double for float64),
// the device's row kernel turns them into losses (and, when a gradient is wanted, overwrites
// them with dloss/dlogits times the row's scale), and two more GEMMs fold that into
// grad_hidden and grad_weight. N x V logits never exist; the buffer holds `rows` x V.
// Layouts: hidden [N, d], weight [V, d], bias [V], labels [N] int64, all contiguous in the driver.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu_isa.h"

namespace stackwise::lce {

struct Options {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
};

// One chunk's rows. logits [n, V] contiguous in the accumulation dtype; labels [n] int64;
// losses [n] (accumulation dtype) and predictions [n] int64 are written (predictions: the first
// index of the row maximum, undefined tensor = not wanted). When row_scale ([n], accumulation
// dtype, any stride including 0) is defined, logits are overwritten by row_scale[r] *
// dloss/dlogits (zero rows for ignored tokens).
using RowKernel = void (*)(at::Tensor& logits, const at::Tensor& labels, at::Tensor& losses,
                           at::Tensor& predictions, const at::Tensor& row_scale,
                           const Options& opt);

struct Result {
  at::Tensor losses;       // [N] accumulation dtype
  at::Tensor predictions;  // [N] int64, or undefined
  at::Tensor grad_hidden;  // [N, d] hidden's dtype, or undefined
  at::Tensor grad_weight;  // [V, d] weight's dtype, or undefined
  at::Tensor grad_bias;    // [V] bias's dtype, or undefined
};

// Checks every argument (names the op and the argument): shapes, dtypes, devices, label range,
// the option values. `device` is the device type the calling implementation serves.
void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                  const Options& opt, at::DeviceType device, const char* op);

// The chunked pass. row_scale: [N] per-token gradient scale (accumulation dtype, any stride) or
// undefined for no gradient; weight_grad: also grad_weight/grad_bias. budget_elems / min_rows size the logits buffer
// (math::lce_rows_per_chunk).
Result run(const at::Tensor& hidden, const at::Tensor& weight,
           const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const Options& opt,
           const at::Tensor& row_scale, bool weight_grad, bool want_predictions, RowKernel kernel,
           int64_t budget_elems, int64_t min_rows);

// The three ops on top of run(), for one device's row kernel (the CPU and CUDA registrations
// differ only in the kernel and the buffer size).
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& hidden, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const at::Tensor& labels, int64_t ignore_index,
                                              double label_smoothing, double z_loss,
                                              at::DeviceType device, RowKernel kernel,
                                              int64_t budget_elems, int64_t min_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_losses, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    double label_smoothing, double z_loss, bool weight_grad, at::DeviceType device,
    RowKernel kernel, int64_t budget_elems, int64_t min_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_op(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, double z_loss,
    c10::string_view reduction, bool weight_grad, at::DeviceType device, RowKernel kernel,
    int64_t budget_elems, int64_t min_rows);

}  // namespace stackwise::lce

// The CPU row kernel, compiled once per ISA (linear_cross_entropy_cpu_kernel.cpp).
STACKWISE_DECLARE_CPU_KERNEL(void, lce_rows_kernel, at::Tensor& logits, const at::Tensor& labels,
                             at::Tensor& losses, at::Tensor& predictions,
                             const at::Tensor& row_scale, const stackwise::lce::Options& opt)
