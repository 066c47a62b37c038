// Which CUDA attention kernel serves which inputs: the host-side dispatch of cuda/attention.cu as
// plain, torch-free functions, so the CPU tests can ask it about every shape the models use.
//
// The CUDA kernel (FlashAttention-2 on WMMA 16x16x16 tensor-core fragments) is one template
// over (element type, Dqk, Dv); it is instantiated for exactly the head-dim pairs of
// kCudaHeadDims (cuda/attention.cu walks this table to pick the instantiation, so the table and
// the compiled kernels cannot disagree). Element types: bfloat16 and float16 (fp32 accumulation).
// Float32 models reach it through bf16/fp16 autocast (training.dtype).
#pragma once

#include <cstddef>
#include <cstdint>

namespace stackwise::attention {

enum class ElemType { kFloat16, kBFloat16, kFloat32, kFloat64, kOther };

struct HeadDims {
  int dqk;
  int dv;
};

// Query/key width, value width. (192, 128) is MLA's: 128 content + 64 rotary features per key.
inline constexpr HeadDims kCudaHeadDims[] = {{32, 32},   {64, 64},   {96, 96},
                                             {128, 128}, {192, 128}, {256, 256}};
inline constexpr std::size_t kNumCudaHeadDims = sizeof(kCudaHeadDims) / sizeof(HeadDims);

// A pair the kernel template accepts at all: both widths positive multiples of 16 (one WMMA
// fragment), so every row is a whole number of 16-byte loads and tensor-core tiles.
constexpr bool tileable(int64_t dqk, int64_t dv) {
  return dqk > 0 && dv > 0 && dqk % 16 == 0 && dv % 16 == 0;
}

// The index of (dqk, dv) in kCudaHeadDims, or -1 when no instantiation serves it.
constexpr int cuda_head_dims_index(int64_t dqk, int64_t dv) {
  for (std::size_t i = 0; i < kNumCudaHeadDims; ++i) {
    if (kCudaHeadDims[i].dqk == dqk && kCudaHeadDims[i].dv == dv) return static_cast<int>(i);
  }
  return -1;
}

constexpr bool cuda_dtype_supported(ElemType t) {
  return t == ElemType::kFloat16 || t == ElemType::kBFloat16;
}

// Why the CUDA kernel cannot serve these inputs, or nullptr when it can.
constexpr const char* cuda_unsupported_reason(ElemType t, int64_t dqk, int64_t dv) {
  if (!cuda_dtype_supported(t)) {
    return "the CUDA kernel takes bfloat16 or float16 q, k, v (fp32 accumulation); run float32 "
           "models under bf16/fp16 autocast (training.dtype) or on the CPU";
  }
  if (cuda_head_dims_index(dqk, dv) < 0) {
    return "the CUDA kernel supports head dims (Dqk, Dv) = (32, 32), (64, 64), (96, 96), "
           "(128, 128), (192, 128) and (256, 256)";
  }
  return nullptr;
}

// Every pair of the table must be one the template can tile (checked at compile time).
constexpr bool table_tileable() {
  for (std::size_t i = 0; i < kNumCudaHeadDims; ++i) {
    if (!tileable(kCudaHeadDims[i].dqk, kCudaHeadDims[i].dv)) return false;
  }
  return true;
}
static_assert(table_tileable(), "every CUDA attention head-dim pair must be a multiple of 16");

}  // namespace stackwise::attention
