// The CUDA attention dispatch of stackwise/attention_dispatch.h, checked without a GPU: which
// (dtype, Dqk, Dv) the kernel serves, that every table entry is one the kernel template can
// tile, and that the error names every served pair. The Python tests check the shipped configs'
// shapes against the Python mirror (stackwise.ops.attention_dispatch) and the mirror against
// this header's table.
#include <gtest/gtest.h>

#include <string>

#include "stackwise/attention_dispatch.h"

namespace att = stackwise::attention;

TEST(AttentionDispatch, ServesTheHeadDimsTheModelsUse) {
  for (int d : {32, 64, 96, 128, 256}) {
    for (auto t : {att::ElemType::kBFloat16, att::ElemType::kFloat16}) {
      EXPECT_EQ(att::cuda_unsupported_reason(t, d, d), nullptr) << d;
    }
  }
  // MLA: Dqk = 128 content + 64 rotary dims, Dv = 128.
  EXPECT_EQ(att::cuda_unsupported_reason(att::ElemType::kBFloat16, 192, 128), nullptr);
  EXPECT_EQ(att::cuda_head_dims_index(192, 128), 4);
}

TEST(AttentionDispatch, RejectsWhatNoKernelServes) {
  using att::ElemType;
  for (auto t : {ElemType::kFloat32, ElemType::kFloat64, ElemType::kOther}) {
    const char* why = att::cuda_unsupported_reason(t, 64, 64);
    ASSERT_NE(why, nullptr);
    EXPECT_NE(std::string(why).find("bfloat16 or float16"), std::string::npos);
  }
  for (auto [dqk, dv] : {std::pair{48, 48}, {64, 128}, {192, 192}, {16, 16}, {0, 0}, {-64, -64}}) {
    EXPECT_EQ(att::cuda_head_dims_index(dqk, dv), -1) << dqk << "," << dv;
    EXPECT_NE(att::cuda_unsupported_reason(ElemType::kBFloat16, dqk, dv), nullptr);
  }
}

TEST(AttentionDispatch, TableIsTileableAndNamedInTheError) {
  const std::string why = att::cuda_unsupported_reason(att::ElemType::kFloat16, 8, 8);
  for (std::size_t i = 0; i < att::kNumCudaHeadDims; ++i) {
    const auto [dqk, dv] = att::kCudaHeadDims[i];
    EXPECT_TRUE(att::tileable(dqk, dv));
    EXPECT_EQ(att::cuda_head_dims_index(dqk, dv), int(i));
    const std::string pair = "(" + std::to_string(dqk) + ", " + std::to_string(dv) + ")";
    EXPECT_NE(why.find(pair), std::string::npos) << pair;
  }
  EXPECT_FALSE(att::tileable(40, 40));
  EXPECT_FALSE(att::tileable(0, 64));
}
