// Portability macros for code shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STACKWISE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STACKWISE_HOST_DEVICE inline
#endif
