// Helpers shared by the CUDA kernels: launch geometry read from the device, and 16-byte
// vector access used by the memory-bound elementwise kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace stackwise::cuda {

// A 16-byte aligned bundle of N elements of T (N = 16 / sizeof(T)): one LDG.128 / STG.128.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Blocks for a grid-stride elementwise kernel: enough to fill every SM (read from the device,
// not assumed) several times over, never more than the work needs.
inline int64_t elementwise_blocks(int64_t work_items, int threads_per_block) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident =
      int64_t(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / threads_per_block);
  const int64_t needed = (work_items + threads_per_block - 1) / threads_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, resident * 4));
}

}  // namespace stackwise::cuda
