// Every schema of the stackwise op library, in one place (DESIGN.md §3). Ops are functional:
// they return new tensors. Backward passes are ops of their own so that autograd (registered in
// Python with torch.library.register_autograd) and torch.compile see them.
#include <torch/library.h>

TORCH_LIBRARY(stackwise, m) {
  // SwiGLU: out = silu(gate) * up, elementwise over equal shapes.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}
