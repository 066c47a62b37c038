// Linear attention as chunked prefix sums of batched matrix products (stackwise/
// linear_attention_math.h gives the element formulas). Written with ATen ops only, so the same
// code runs on any device: it is the CUDA implementation (the products go to cuBLAS, the prefix
// sum over chunks is one cumsum) and the CPU tests exercise it through
// stackwise._C._linear_attention_chunked(_backward).
//
// With v' = [v, 1] (the extra column carries the normaliser), per (batch, head) and chunks of C
// positions:
//   state_c   = sum over chunks c' < c of K_c'^T V'_c'                 [M, Dv+1]
//   numden_c  = Q_c state_c + tril(Q_c K_c^T) V'_c                     [C, Dv+1]
//   out       = numden[:, :Dv] / (numden[:, Dv] + eps)
// (non-causal: numden = Q (K^T V')). The backward is three unnormalised linear attentions
// (see the header): dq = LA_causal(G', v', k), dk = LA_anti(v', G', q), dv' = LA_anti(k, q, G'),
// where "anti" sums over s >= t (the causal form on the reversed sequence). Everything is
// computed in float32 (float64 for float64 inputs) and rounded once to the input dtype.
#include "linear_attention_chunked.h"

#include <ATen/ATen.h>

#include "linear_attention_checks.h"

namespace stackwise {
namespace {

at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Unnormalised linear attention sum_{t in T(s)} (a[s].b[t]) c[t] over [N, S, *] tensors (N =
// batch * heads), T(s) = all t, t <= s (causal) or t >= s (anti-causal).
enum class Span { kAll, kCausal, kAnti };

at::Tensor unnormalised(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, Span span,
                        int64_t chunk) {
  if (span == Span::kAll) return at::bmm(a, at::bmm(b.transpose(1, 2), c));
  if (span == Span::kAnti) {
    return unnormalised(a.flip(1), b.flip(1), c.flip(1), Span::kCausal, chunk).flip(1);
  }
  const int64_t n = a.size(0), s = a.size(1), m = a.size(2), w = c.size(2);
  const int64_t chunks = (s + chunk - 1) / chunk;
  const int64_t padded = chunks * chunk;
  auto pad = [&](const at::Tensor& t) {
    if (padded == s) return t;
    // Zero rows: a zero key adds nothing to any state, a zero query's row is sliced off.
    return at::constant_pad_nd(t, {0, 0, 0, padded - s});
  };
  const at::Tensor ac = pad(a).reshape({n * chunks, chunk, m});
  const at::Tensor bc = pad(b).reshape({n * chunks, chunk, m});
  const at::Tensor cc = pad(c).reshape({n * chunks, chunk, w});
  // Per-chunk states, then the exclusive prefix sum over chunks.
  const at::Tensor states = at::bmm(bc.transpose(1, 2), cc).reshape({n, chunks, m, w});
  const at::Tensor before = (states.cumsum(1) - states).reshape({n * chunks, m, w});
  const at::Tensor scores = at::bmm(ac, bc.transpose(1, 2)).tril();
  const at::Tensor out = at::baddbmm(at::bmm(scores, cc), ac, before);
  return out.reshape({n, padded, w}).narrow(1, 0, s);
}

struct Flat {
  at::Tensor q, k, vp;  // [N, S, M], [N, S, M], [N, S, Dv+1] in the accumulation type
};

Flat flatten(const at::Tensor& phi_q, const at::Tensor& phi_k, const at::Tensor& v) {
  const at::ScalarType acc = acc_of(phi_q);
  const int64_t n = phi_q.size(0) * phi_q.size(1), s = phi_q.size(2);
  const at::Tensor q = phi_q.to(acc).reshape({n, s, phi_q.size(3)});
  const at::Tensor k = phi_k.to(acc).reshape({n, s, phi_k.size(3)});
  const at::Tensor vf = v.to(acc).reshape({n, s, v.size(3)});
  const at::Tensor vp = at::cat({vf, at::ones({n, s, 1}, vf.options())}, 2);
  return {q, k, vp};
}

void check_chunk(int64_t chunk, const char* op) {
  TORCH_CHECK_VALUE(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
}

}  // namespace

at::Tensor linear_attention_chunked(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                    const at::Tensor& v, bool causal, double eps,
                                    int64_t chunk) {
  constexpr const char* op = "linear_attention";
  check_linear_attention_inputs(phi_q, phi_k, v, op);
  check_linear_attention_eps(eps, op);
  check_chunk(chunk, op);
  if (v.numel() == 0 || phi_q.size(3) == 0) return at::zeros(v.sizes(), v.options());
  const Flat f = flatten(phi_q, phi_k, v);
  const at::Tensor numden =
      unnormalised(f.q, f.k, f.vp, causal ? Span::kCausal : Span::kAll, chunk);
  const int64_t dv = v.size(3);
  const at::Tensor out = numden.narrow(2, 0, dv) / (numden.narrow(2, dv, 1) + eps);
  return out.to(v.scalar_type()).reshape(v.sizes()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_chunked_backward(
    const at::Tensor& grad_out, const at::Tensor& phi_q, const at::Tensor& phi_k,
    const at::Tensor& v, bool causal, double eps, int64_t chunk) {
  constexpr const char* op = "linear_attention_backward";
  check_linear_attention_inputs(phi_q, phi_k, v, op);
  check_like(v, "v", grad_out, "grad_out", op);
  check_linear_attention_eps(eps, op);
  check_chunk(chunk, op);
  if (phi_q.size(0) * phi_q.size(1) * phi_q.size(2) == 0 || phi_q.size(3) == 0) {
    return {at::zeros(phi_q.sizes(), phi_q.options()), at::zeros(phi_k.sizes(), phi_k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  const Flat f = flatten(phi_q, phi_k, v);
  const Span fwd = causal ? Span::kCausal : Span::kAll;
  const Span bwd = causal ? Span::kAnti : Span::kAll;
  const int64_t dv = v.size(3);
  const at::Tensor numden = unnormalised(f.q, f.k, f.vp, fwd, chunk);
  const at::Tensor num = numden.narrow(2, 0, dv);
  const at::Tensor den = numden.narrow(2, dv, 1) + eps;
  const at::Tensor g = grad_out.to(acc_of(phi_q)).reshape(num.sizes());
  // G' = [g / den, dL/dden] with dL/dden = -((g . num) / den) / den (linear_attention_math.h).
  const at::Tensor g_den = -((g * num).sum(2, /*keepdim=*/true) / den) / den;
  const at::Tensor gp = at::cat({g / den, g_den}, 2);
  const at::Tensor dq = unnormalised(gp, f.vp, f.k, fwd, chunk);
  const at::Tensor dk = unnormalised(f.vp, gp, f.q, bwd, chunk);
  const at::Tensor dvp = unnormalised(f.k, f.q, gp, bwd, chunk);
  return {dq.to(phi_q.scalar_type()).reshape(phi_q.sizes()).contiguous(),
          dk.to(phi_k.scalar_type()).reshape(phi_k.sizes()).contiguous(),
          dvp.narrow(2, 0, dv).to(v.scalar_type()).reshape(v.sizes()).contiguous()};
}

}  // namespace stackwise
