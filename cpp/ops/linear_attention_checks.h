// Argument checks of linear attention, shared by the CPU and (later) CUDA dispatchers. Each
// names the op and the argument (docs/DESIGN.md §6).
//   phi_q[B,H,S,M], phi_k[B,H,S,M], v[B,H,S,Dv]; eps finite and >= 0
//   backward: grad_out [B,H,S,Dv] like v
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace stackwise {

inline void check_rank4(const at::Tensor& t, const char* op, const char* arg, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", arg, " must be a 4-D tensor ", dims, ", got shape ",
                    t.sizes());
}

inline void check_linear_attention_inputs(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                          const at::Tensor& v, const char* op) {
  check_float_tensor(phi_q, op, "phi_q");
  check_rank4(phi_q, op, "phi_q", "[B, H, S, M]");
  check_like(phi_q, "phi_q", phi_k, "phi_k", op);
  TORCH_CHECK(v.defined(), op, ": v is an undefined tensor");
  TORCH_CHECK(v.device() == phi_q.device(), op, ": v is on ", v.device(), " but phi_q is on ",
              phi_q.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(v.scalar_type() == phi_q.scalar_type(), op, ": v has dtype ", v.scalar_type(),
                   " but phi_q has dtype ", phi_q.scalar_type(), "; they must match");
  check_rank4(v, op, "v", "[B, H, S, Dv]");
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == phi_q.sizes().slice(0, 3), op, ": v has shape ",
                    v.sizes(), "; its [B, H, S] must match phi_q's shape ", phi_q.sizes());
  // The tile GEMMs take 32-bit sizes (BLAS LP64).
  constexpr int64_t kMaxWidth = std::numeric_limits<int32_t>::max() - 1;
  TORCH_CHECK_VALUE(phi_q.size(3) <= kMaxWidth, op, ": phi_q has ", phi_q.size(3),
                    " features; at most ", kMaxWidth, " are supported");
  TORCH_CHECK_VALUE(v.size(3) <= kMaxWidth, op, ": v has ", v.size(3),
                    " channels; at most ", kMaxWidth, " are supported");
}

inline void check_linear_attention_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op,
                    ": eps must be a finite number >= 0, got ", eps);
}

}  // namespace stackwise
