// Calls stackwise::linear_attention and its backward through the PyTorch dispatcher (no Python),
// compares with the explicit S x S form in ATen, and checks the scalar normaliser math.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "stackwise/linear_attention_math.h"

namespace {

at::Tensor call_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 bool causal, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stackwise::linear_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         bool, double)>();
  return op.call(q, k, v, causal, eps);
}

at::Tensor explicit_form(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         bool causal, double eps) {
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2));
  if (causal) scores = at::tril(scores);
  return at::matmul(scores, v) / (scores.sum(-1, /*keepdim=*/true) + eps);
}

}  // namespace

TEST(LinearAttentionDispatch, MatchesExplicitForm) {
  for (int64_t s : {1, 7, 64, 123}) {
    for (bool causal : {false, true}) {
      at::Tensor q = at::rand({2, 3, s, 5}, at::kDouble) + 0.1;
      at::Tensor k = at::rand({2, 3, s, 5}, at::kDouble) + 0.1;
      at::Tensor v = at::randn({2, 3, s, 7}, at::kDouble);
      at::Tensor out = call_linear_attention(q, k, v, causal, 1e-6);
      EXPECT_TRUE(at::allclose(out, explicit_form(q, k, v, causal, 1e-6), 1e-10, 1e-12))
          << "S=" << s << " causal=" << causal;
    }
  }
}

TEST(LinearAttentionDispatch, RejectsBadInputs) {
  at::Tensor q = at::rand({2, 3, 8, 4});
  at::Tensor v = at::randn({2, 3, 8, 5});
  EXPECT_THROW(call_linear_attention(q[0], q[0], v[0], false, 1e-6), c10::ValueError);
  EXPECT_THROW(call_linear_attention(q, q.narrow(3, 0, 3), v, false, 1e-6), c10::ValueError);
  EXPECT_THROW(call_linear_attention(q, q, v.narrow(2, 0, 7), false, 1e-6), c10::ValueError);
  EXPECT_THROW(call_linear_attention(q, q, v, false, -1.0), c10::ValueError);
  EXPECT_THROW(call_linear_attention(q.to(at::kInt), q.to(at::kInt), v.to(at::kInt), false, 0.0),
               c10::TypeError);
}

TEST(LinearAttentionMath, NormaliserAndItsGradient) {
  EXPECT_EQ(stackwise::math::linear_attention_den(2.0f, 0.5f), 2.5f);
  // dL/dden = -(g.num)/den^2, computed without forming den^2 (which underflows to 0 in float).
  const float tiny = 1e-25f;
  const float grad = stackwise::math::linear_attention_grad_den(tiny, tiny);
  EXPECT_TRUE(std::isfinite(grad));
  EXPECT_FLOAT_EQ(grad, -1.0f / tiny);
  EXPECT_DOUBLE_EQ(stackwise::math::linear_attention_grad_den(3.0, 2.0), -0.75);
}
