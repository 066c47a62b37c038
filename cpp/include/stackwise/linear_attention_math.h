// Linear ("kernel") attention, scalar pieces (Katharopoulos et al. 2020, "Transformers are
// RNNs", eq. 4-6). With feature maps q = phi(Q)[S,M], k = phi(K)[S,M], values v[S,Dv] and T(s)
// the attended positions (all t, or t <= s when causal):
//   num[s] = sum_{t in T(s)} (q[s].k[t]) v[t]          (= q[s] KV_s,  KV_s = sum k[t]^T v[t])
//   den[s] = q[s] . (sum_{t in T(s)} k[t]) + eps       (= q[s] z_s   + eps)
//   out[s] = num[s] / den[s]
// eps is added to the normaliser as is (no clamping, no abs): with non-negative features
// den >= eps > 0, and where q[s].z_s is ~0 every q[s].k[t] is ~0 too, so out[s] ~ 0/eps ~ 0. With
// features that can be negative (random Fourier features) den can reach 0 and out is unbounded;
// the caller picks such maps knowingly. eps = 0 with den = 0 gives inf/nan, as division does.
//
// Backward, with g = dL/dout[s]:
//   dL/dnum[s] = g[s] / den[s]
//   dL/dden[s] = -(g[s] . out[s]) / den[s] = -(g[s] . num[s]) / den[s]^2
// Writing v'[t] = [v[t], 1] and G'[s] = [dL/dnum[s], dL/dden[s]] (width Dv+1), num and den are
// one product q[s] sum k[t]^T v'[t], and the gradients are linear attention without normaliser:
//   dq[s] = sum_{t in T(s)} (G'[s].v'[t]) k[t]
//   dk[t] = sum_{s: t in T(s)} (G'[s].v'[t]) q[s]
//   dv[t] = sum_{s: t in T(s)} (q[s].k[t]) G'[s][:Dv]
// The CPU and CUDA kernels share these element formulas; the products run as tile GEMMs.
#pragma once

#include "stackwise/macros.h"

namespace stackwise::math {

// Normaliser of one output row from its raw dot product q[s].z_s.
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t linear_attention_den(acc_t qz, acc_t eps) {
  return qz + eps;
}

// The extra column of G': dL/dden[s] from g[s].num[s] (the unnormalised output) and den[s].
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t linear_attention_grad_den(acc_t g_dot_num, acc_t den) {
  return -(g_dot_num / den) / den;  // not den * den: that underflows first for tiny den
}

}  // namespace stackwise::math
