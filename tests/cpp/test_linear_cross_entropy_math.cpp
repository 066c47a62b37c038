// The torch-free math of stackwise/linear_cross_entropy_math.h, shared by the CPU and CUDA
// linear cross-entropy kernels: online log-sum-exp (push and merge in any split equal the
// one-shot value, -inf handled), the per-token loss and logit gradient against their closed
// forms and a finite difference, and the chunk bookkeeping (chunks tile [0, N) exactly).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "stackwise/linear_cross_entropy_math.h"

namespace math = stackwise::math;

namespace {

double lse_direct(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double x : z) m = std::max(m, x);
  double s = 0;
  for (double x : z) s += std::exp(x - m);
  return m + std::log(s);
}

double lse_pushed(const std::vector<double>& z, size_t from, size_t to) {
  math::LseState<double> s = math::lse_empty<double>();
  for (size_t i = from; i < to; ++i) s = math::lse_push(s, z[i]);
  return math::lse_value(s);
}

// Loss of one row with all options, straight from the definition.
double loss_direct(const std::vector<double>& z, int64_t y, double eps, double lam) {
  const double lse = lse_direct(z);
  const double v = static_cast<double>(z.size());
  double loss = 0;
  for (size_t i = 0; i < z.size(); ++i) {
    const double q = (static_cast<int64_t>(i) == y ? 1.0 - eps : 0.0) + eps / v;
    loss -= q * (z[i] - lse);
  }
  return loss + lam * lse * lse;
}

double loss_from_header(const std::vector<double>& z, int64_t y, double eps, double lam) {
  double sum_z = 0;
  for (double x : z) sum_z += x;
  return math::lce_token_loss<double>(lse_direct(z), z[y], sum_z, z.size(), eps, lam);
}

const std::vector<double> kRow{0.3, -1.2, 4.0, 2.5, -0.7, 0.0, 3.9, -5.0, 1.1};

}  // namespace

TEST(LinearCrossEntropyMath, PushAndMergeEqualOneShot) {
  const double ref = lse_direct(kRow);
  EXPECT_NEAR(lse_pushed(kRow, 0, kRow.size()), ref, 1e-12);
  for (size_t cut = 0; cut <= kRow.size(); ++cut) {
    math::LseState<double> a = math::lse_empty<double>(), b = math::lse_empty<double>();
    for (size_t i = 0; i < cut; ++i) a = math::lse_push(a, kRow[i]);
    for (size_t i = cut; i < kRow.size(); ++i) b = math::lse_push(b, kRow[i]);
    EXPECT_NEAR(math::lse_value(math::lse_merge(a, b)), ref, 1e-12) << "cut " << cut;
    EXPECT_NEAR(math::lse_value(math::lse_merge(b, a)), ref, 1e-12) << "cut " << cut;
  }
}

TEST(LinearCrossEntropyMath, NegativeInfinityAndEmpty) {
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(math::lse_value(math::lse_empty<double>()), -inf);
  math::LseState<double> s = math::lse_push(math::lse_empty<double>(), -inf);
  EXPECT_EQ(math::lse_value(s), -inf);
  s = math::lse_push(s, 2.0);
  s = math::lse_push(s, -inf);
  EXPECT_NEAR(math::lse_value(s), 2.0, 1e-15);
  EXPECT_NEAR(math::lse_value(math::lse_merge(math::lse_empty<double>(), s)), 2.0, 1e-15);
  // Large logits do not overflow: the state keeps exp(x - max).
  math::LseState<float> f = math::lse_empty<float>();
  f = math::lse_push(f, 1000.0f);
  f = math::lse_push(f, 1000.0f);
  EXPECT_NEAR(math::lse_value(f), 1000.0f + std::log(2.0f), 1e-3);
}

TEST(LinearCrossEntropyMath, LossMatchesDefinition) {
  for (double eps : {0.0, 0.1, 1.0}) {
    for (double lam : {0.0, 1e-4, 0.5}) {
      for (int64_t y : {0, 2, 8}) {
        EXPECT_NEAR(loss_from_header(kRow, y, eps, lam), loss_direct(kRow, y, eps, lam), 1e-12)
            << "eps " << eps << " lam " << lam << " y " << y;
      }
    }
  }
}

TEST(LinearCrossEntropyMath, GradientMatchesFiniteDifference) {
  const double h = 1e-6;
  for (double eps : {0.0, 0.2}) {
    for (double lam : {0.0, 0.3}) {
      const int64_t y = 3;
      const double scale = 0.7;
      const double lse = lse_direct(kRow);
      const auto c = math::lce_grad_coefs<double>(lse, kRow.size(), eps, lam, scale);
      for (size_t i = 0; i < kRow.size(); ++i) {
        std::vector<double> up = kRow, down = kRow;
        up[i] += h;
        down[i] -= h;
        const double fd =
            scale * (loss_direct(up, y, eps, lam) - loss_direct(down, y, eps, lam)) / (2 * h);
        const double g = math::lce_logit_grad<double>(kRow[i], lse, static_cast<int64_t>(i) == y, c);
        EXPECT_NEAR(g, fd, 1e-7) << "i " << i << " eps " << eps << " lam " << lam;
      }
    }
  }
}

TEST(LinearCrossEntropyMath, GradientSumsToZeroWithoutZLoss) {
  // Softmax minus a distribution: the row gradient sums to 0 (to 2 lam lse with the z-loss).
  const double lse = lse_direct(kRow);
  for (double lam : {0.0, 0.25}) {
    const auto c = math::lce_grad_coefs<double>(lse, kRow.size(), 0.1, lam, 1.0);
    double sum = 0;
    for (size_t i = 0; i < kRow.size(); ++i) sum += math::lce_logit_grad(kRow[i], lse, i == 4, c);
    EXPECT_NEAR(sum, 2 * lam * lse, 1e-12);
  }
}

TEST(LinearCrossEntropyMath, ChunksTileTheRange) {
  for (int64_t n : {1, 7, 123, 2048}) {
    for (int64_t vocab : {1, 259, 50259, 128256}) {
      const int64_t rows = math::lce_rows_per_chunk(n, vocab, 1 << 18, 128, 8);
      ASSERT_GE(rows, 1);
      ASSERT_LE(rows, n);
      if (rows < n) {
        EXPECT_GE(rows, std::min<int64_t>(n, 128));
        if (rows > 8) EXPECT_EQ(rows % 8, 0);
      }
      int64_t covered = 0;
      const int64_t chunks = math::lce_num_chunks(n, rows);
      for (int64_t c = 0; c < chunks; ++c) {
        const math::LceRange r = math::lce_chunk(c, rows, n);
        EXPECT_EQ(r.begin, covered);
        EXPECT_GT(r.end, r.begin);
        covered = r.end;
      }
      EXPECT_EQ(covered, n) << "n " << n << " vocab " << vocab;
    }
  }
  EXPECT_EQ(math::lce_rows_per_chunk(0, 100, 1000, 1, 1), 0);
  EXPECT_EQ(math::lce_num_chunks(0, 5), 0);
  // A budget smaller than one row still gives min_rows rows.
  EXPECT_EQ(math::lce_rows_per_chunk(1000, 1 << 20, 1 << 18, 64, 8), 64);
}
