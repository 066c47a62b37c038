// The online-softmax conventions of stackwise/attention_math.h (shared by the CPU and CUDA
// attention kernels): blockwise accumulation equals the one-shot softmax, fully masked rows give
// l = 0, output 0 and lse = +inf, and the backward's probabilities are then exactly 0.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "stackwise/attention_math.h"

namespace math = stackwise::math;

namespace {

// Runs the online update over `scores` in blocks of `block`; returns (m, l).
std::pair<double, double> online(const std::vector<double>& scores, size_t block) {
  double m = math::neg_inf<double>(), l = 0;
  for (size_t j0 = 0; j0 < scores.size(); j0 += block) {
    double tile_max = math::neg_inf<double>();
    for (size_t j = j0; j < std::min(scores.size(), j0 + block); ++j) {
      tile_max = std::max(tile_max, scores[j]);
    }
    const double m_new = std::max(m, tile_max);
    const double alpha = math::rescale_factor(m, m_new);
    double sum = 0;
    for (size_t j = j0; j < std::min(scores.size(), j0 + block); ++j) {
      sum += math::attn_exp(scores[j] - math::safe_max(m_new));
    }
    l = l * alpha + sum;
    m = m_new;
  }
  return {m, l};
}

}  // namespace

TEST(AttentionMath, BlockwiseEqualsOneShot) {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> s{0.5, -inf, 3.0, 2.0, -1.0, -inf, 7.5, 0.0};
  double ref = 0;
  for (double x : s) ref += std::exp(x);
  for (size_t block : {1, 2, 3, 8}) {
    const auto [m, l] = online(s, block);
    EXPECT_DOUBLE_EQ(m, 7.5);
    EXPECT_NEAR(math::final_lse(m, l), std::log(ref), 1e-12) << "block " << block;
  }
}

TEST(AttentionMath, FullyMaskedRow) {
  const double inf = std::numeric_limits<double>::infinity();
  const auto [m, l] = online({-inf, -inf, -inf}, 2);
  EXPECT_EQ(l, 0.0);
  EXPECT_EQ(math::inverse_sum(l), 0.0);  // output row 0
  const double lse = math::final_lse(m, l);
  EXPECT_EQ(lse, inf);
  EXPECT_EQ(math::prob_from_lse(-inf, lse), 0.0);  // backward probabilities vanish, no NaN
  EXPECT_EQ(math::prob_from_lse(3.0, lse), 0.0);
  EXPECT_FALSE(std::isnan(math::rescale_factor(-inf, -inf)));
}

TEST(AttentionMath, CausalVisibility) {
  EXPECT_EQ(math::visible_keys(5, 0, 4, true), 4);
  EXPECT_EQ(math::visible_keys(5, 4, 4, true), 2);
  EXPECT_EQ(math::visible_keys(5, 8, 4, true), 0);
  EXPECT_EQ(math::visible_keys(5, 8, 4, false), 4);
  EXPECT_TRUE(math::key_visible(3, 3, true));
  EXPECT_FALSE(math::key_visible(3, 4, true));
}
