// Every schema of the stackwise op library, in one place (DESIGN.md §3). Ops are functional:
// they return new tensors. Backward passes are ops of their own so that autograd (registered in
// Python with torch.library.register_autograd) and torch.compile see them.
#include <torch/library.h>

TORCH_LIBRARY(stackwise, m) {
  // SwiGLU: out = silu(gate) * up, elementwise over equal shapes.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // Linear (kernel) attention over feature maps: out = phi_q (sum phi_k^T v) / (phi_q . sum phi_k
  // + eps), over all positions or, when causal, the prefix t <= s. The backward recomputes the
  // normalisers from the inputs.
  m.def(
      "linear_attention(Tensor phi_q, Tensor phi_k, Tensor v, bool causal=False, float eps=1e-06)"
      " -> Tensor");
  m.def(
      "linear_attention_backward(Tensor grad_out, Tensor phi_q, Tensor phi_k, Tensor v, "
      "bool causal, float eps) -> (Tensor, Tensor, Tensor)");
}
