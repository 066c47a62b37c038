// Calls stackwise::rms_norm(_backward) and stackwise::rope(_backward) through the PyTorch
// dispatcher (no Python), compares with ATen formulas, checks the shared scalar math headers and
// that bad arguments throw the typed errors Python maps to ValueError.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "stackwise/rms_norm_math.h"
#include "stackwise/rope_math.h"

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair call_rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stackwise::rms_norm", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, w, eps);
}

Pair call_rope(const char* name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& c,
               const at::Tensor& s, int64_t rotary_dim, int64_t offset) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Pair(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
      int64_t)>();
  return op.call(q, k, c, s, rotary_dim, offset);
}

at::Tensor rms_ref(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

}  // namespace

TEST(RmsNormMath, ScalarFormulas) {
  // Row (3, 4): mean square 12.5.
  const float r = stackwise::math::rms_norm_rstd<float>(25.f, 2, 0.f);
  EXPECT_FLOAT_EQ(r, 1.f / std::sqrt(12.5f));
  EXPECT_FLOAT_EQ(stackwise::math::rms_norm_forward<float>(3.f, r, 2.f), 6.f * r);
  const double c = stackwise::math::rms_norm_backward_coef<double>(5.0, 0.5, 2);
  EXPECT_DOUBLE_EQ(c, 0.625);
  EXPECT_DOUBLE_EQ(stackwise::math::rms_norm_backward_input<double>(1.0, 2.0, 3.0, 0.5, c),
                   0.5 * (3.0 - 2.0 * 0.625));
}

TEST(RopeMath, RotationAndInverse) {
  const double angle = 0.3;
  double a, b, a2, b2;
  stackwise::math::rope_rotate_pair<double>(1.0, 2.0, std::cos(angle), std::sin(angle), a, b);
  stackwise::math::rope_rotate_pair<double>(a, b, std::cos(angle), -std::sin(angle), a2, b2);
  EXPECT_NEAR(a2, 1.0, 1e-15);
  EXPECT_NEAR(b2, 2.0, 1e-15);
  EXPECT_NEAR(a * a + b * b, 5.0, 1e-14);
}

TEST(RmsNormDispatch, ForwardMatchesAten) {
  for (int64_t d : {1, 7, 33, 4099}) {
    at::Tensor x = at::randn({5, d}, at::kFloat);
    at::Tensor w = at::randn({d}, at::kFloat);
    auto [out, rstd] = call_rms_norm(x, w, 1e-6);
    EXPECT_TRUE(at::allclose(out, rms_ref(x, w, 1e-6), 1e-5, 1e-6)) << "d=" << d;
    EXPECT_EQ(rstd.sizes(), at::IntArrayRef({5}));
  }
}

TEST(RmsNormDispatch, NonContiguousInput) {
  at::Tensor x = at::randn({33, 17}, at::kDouble).t();
  at::Tensor w = at::randn({33}, at::kDouble);
  auto [out, rstd] = call_rms_norm(x, w, 1e-6);
  EXPECT_TRUE(at::allclose(out, rms_ref(x, w, 1e-6), 1e-12, 1e-12));
}

TEST(RmsNormDispatch, RejectsWrongWeightShape) {
  EXPECT_THROW(call_rms_norm(at::randn({3, 5}), at::randn({4}), 1e-6), c10::ValueError);
}

TEST(RopeDispatch, ForwardMatchesFormulaAndBackwardInverts) {
  const int64_t s = 6, d = 20, rd = 16, h = rd / 2, offset = 2;
  at::Tensor pos = at::arange(s + offset, at::kDouble).unsqueeze(1);
  at::Tensor inv = at::pow(10000.0, -at::arange(0, rd, 2, at::kDouble) / double(rd));
  at::Tensor angles = pos * inv;
  at::Tensor cos = angles.cos().to(at::kFloat), sin = angles.sin().to(at::kFloat);
  at::Tensor q = at::randn({2, 3, s, d}, at::kDouble);
  at::Tensor k = at::randn({2, 1, s, d}, at::kDouble);
  auto [qo, ko] = call_rope("stackwise::rope", q, k, cos, sin, rd, offset);
  at::Tensor c = cos.slice(0, offset).to(at::kDouble), sn = sin.slice(0, offset).to(at::kDouble);
  at::Tensor x1 = q.narrow(-1, 0, h), x2 = q.narrow(-1, h, h);
  EXPECT_TRUE(at::allclose(qo.narrow(-1, 0, h), x1 * c - x2 * sn, 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(qo.narrow(-1, h, h), x2 * c + x1 * sn, 1e-12, 1e-12));
  EXPECT_TRUE(at::equal(qo.narrow(-1, rd, d - rd), q.narrow(-1, rd, d - rd)));
  auto [qb, kb] = call_rope("stackwise::rope_backward", qo, ko, cos, sin, rd, offset);
  // The float32 tables satisfy cos^2 + sin^2 = 1 only to ~1e-7, so the round trip is that close.
  EXPECT_TRUE(at::allclose(qb, q, 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(kb, k, 1e-6, 1e-6));
}

TEST(RopeDispatch, RejectsOddRotaryDimAndShortTable) {
  at::Tensor q = at::randn({1, 2, 4, 8});
  at::Tensor t = at::ones({4, 4});
  EXPECT_THROW(call_rope("stackwise::rope", q, q, t, t, 7, 0), c10::ValueError);
  EXPECT_THROW(call_rope("stackwise::rope", q, q, t, t, 8, 1), c10::ValueError);
}
