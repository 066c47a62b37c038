// Every schema of the stackwise op library, in one place (docs/DESIGN.md §3). Ops are functional:
// they return new tensors. Backward passes are ops of their own so that autograd (registered in
// Python with torch.library.register_autograd) and torch.compile see them.
#include <torch/library.h>

TORCH_LIBRARY(stackwise, m) {
  // SwiGLU: out = silu(gate) * up, elementwise over equal shapes.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");

  // Quantization (formats in stackwise/quant_formats.h). int8/fp8 work on rows of a 2-D tensor;
  // the Python wrappers map axes, blocks and whole tensors onto rows.
  m.def("quantize_nf4(Tensor x, int block_size) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, int[] shape, int block_size, "
        "ScalarType dtype) -> Tensor");
  m.def("quantize_int8(Tensor x) -> (Tensor q, Tensor scale)");
  m.def("dequantize_int8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  m.def("quantize_fp8(Tensor x, ScalarType fp8_dtype) -> (Tensor q, Tensor scale)");
  m.def("dequantize_fp8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  // y = x · dequant(W)ᵀ + bias for a frozen quantized weight; the backward gives dx only.
  m.def("quantized_linear(Tensor x, Tensor qweight, Tensor scales, str fmt, int out_features, "
        "int in_features, int block_size, Tensor? bias) -> Tensor");
  m.def("quantized_linear_backward(Tensor grad_out, Tensor qweight, Tensor scales, str fmt, "
        "int out_features, int in_features, int block_size) -> Tensor");

  // RMSNorm over the last dimension: out = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps).
  // The forward also returns rstd (float32, float64 for float64 x), which the backward reuses.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd)"
      " -> (Tensor, Tensor)");

  // Rotary position embedding of q [B,Hq,S,D] and k [B,Hk,S,D] in one pass, rotate_half
  // pairing, cos/sin tables [max_positions, rotary_dim/2] float32. The backward is the inverse
  // rotation of the output gradients.
  m.def(
      "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, int rotary_dim, int position_offset)"
      " -> (Tensor, Tensor)");
  m.def(
      "rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, int rotary_dim,"
      " int position_offset) -> (Tensor, Tensor)");

  // Linear (kernel) attention over feature maps: out = phi_q (sum phi_k^T v) / (phi_q . sum phi_k
  // + eps), over all positions or, when causal, the prefix t <= s. The backward recomputes the
  // normalisers from the inputs.
  m.def(
      "linear_attention(Tensor phi_q, Tensor phi_k, Tensor v, bool causal=False, float eps=1e-06)"
      " -> Tensor");
  m.def(
      "linear_attention_backward(Tensor grad_out, Tensor phi_q, Tensor phi_k, Tensor v, "
      "bool causal, float eps) -> (Tensor, Tensor, Tensor)");

  // Attention: softmax(scale * q k^T + masks) v over q [B,Hq,S,Dqk], k [B,Hkv,S,Dqk],
  // v [B,Hkv,S,Dv]; returns the output and the per-row log-sum-exp the backward recomputes from.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
      "float? scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, bool causal, float? scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Linear cross-entropy: per-token CE(hidden [N,d] . weight[V,d]^T + bias[V], labels[N]) with
  // ignore_index, label smoothing and z-loss, chunked so N x V logits never exist. The forward
  // gives per-token losses and the first index of each row's maximum; the backward recomputes
  // the logits per chunk; the fused op returns a mean/sum loss with its gradients. weight_grad=False
  // (a frozen head) skips the weight/bias gradient GEMM and returns empty [0] tensors for them.
  m.def(
      "linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "int ignore_index, float label_smoothing, float z_loss) -> (Tensor losses, "
      "Tensor predictions)");
  m.def(
      "linear_cross_entropy_backward(Tensor grad_losses, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor labels, int ignore_index, float label_smoothing, float z_loss, "
      "bool weight_grad) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_cross_entropy_fused(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "int ignore_index, float label_smoothing, float z_loss, str reduction, bool weight_grad) -> "
      "(Tensor loss, "
      "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}
