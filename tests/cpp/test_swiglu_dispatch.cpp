// Calls stackwise::swiglu and stackwise::swiglu_backward through the PyTorch dispatcher (no
// Python) and compares with ATen's own silu, including a non-contiguous input and the errors.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <tuple>

namespace {

at::Tensor call_swiglu(const at::Tensor& g, const at::Tensor& u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stackwise::swiglu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(g, u);
}

std::tuple<at::Tensor, at::Tensor> call_swiglu_backward(const at::Tensor& dy, const at::Tensor& g,
                                                        const at::Tensor& u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stackwise::swiglu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(dy, g, u);
}

}  // namespace

TEST(SwigluDispatch, ForwardMatchesAten) {
  for (int64_t n : {1, 7, 123, 4099}) {
    at::Tensor g = at::randn({n}, at::kFloat);
    at::Tensor u = at::randn({n}, at::kFloat);
    at::Tensor ref = at::silu(g) * u;
    EXPECT_TRUE(at::allclose(call_swiglu(g, u), ref, 1e-5, 1e-6)) << "n=" << n;
  }
}

TEST(SwigluDispatch, NonContiguousInput) {
  at::Tensor g = at::randn({33, 17}, at::kFloat).t();
  at::Tensor u = at::randn({17, 33}, at::kFloat);
  EXPECT_TRUE(at::allclose(call_swiglu(g, u), at::silu(g) * u, 1e-5, 1e-6));
}

TEST(SwigluDispatch, BackwardMatchesFormula) {
  at::Tensor g = at::randn({5, 301}, at::kDouble);
  at::Tensor u = at::randn({5, 301}, at::kDouble);
  at::Tensor dy = at::randn({5, 301}, at::kDouble);
  auto [dg, du] = call_swiglu_backward(dy, g, u);
  at::Tensor s = at::sigmoid(g);
  EXPECT_TRUE(at::allclose(du, dy * g * s, 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(dg, dy * u * s * (1 + g * (1 - s)), 1e-12, 1e-12));
}

TEST(SwigluDispatch, RejectsBadInputs) {
  at::Tensor g = at::randn({4, 4}, at::kFloat);
  EXPECT_THROW(call_swiglu(g, at::randn({4, 5}, at::kFloat)), c10::Error);
  EXPECT_THROW(call_swiglu(g, at::randn({4, 4}, at::kDouble)), c10::Error);
  EXPECT_THROW(call_swiglu(g.to(at::kInt), g.to(at::kInt)), c10::Error);
}
