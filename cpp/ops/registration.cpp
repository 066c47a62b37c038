// Every schema of the stackwise op library, in one place (DESIGN.md §3). Ops are functional:
// they return new tensors. Backward passes are ops of their own so that autograd (registered in
// Python with torch.library.register_autograd) and torch.compile see them.
#include <torch/library.h>

TORCH_LIBRARY(stackwise, m) {
  // SwiGLU: out = silu(gate) * up, elementwise over equal shapes.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // Attention: softmax(scale * q k^T + masks) v over q [B,Hq,S,Dqk], k [B,Hkv,S,Dqk],
  // v [B,Hkv,S,Dv]; returns the output and the per-row log-sum-exp the backward recomputes from.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
      "float? scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, bool causal, float? scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
