// Quantization kernels on CUDA, the same formats and arithmetic as the CPU kernels
// (stackwise/quant_formats.h), so both produce the same bits.
//   NF4 quantize: one warp per quantization block finds absmax (shuffle reduction), then each
//     lane encodes pairs of elements into bytes. Dequantize: one thread per packed byte,
//     16-entry code book in shared memory.
//   int8 / fp8 rows: one thread block per row (block reduction for absmax), then encode.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <tuple>

#include "common.cuh"
#include "quant_dispatch.h"
#include "quant_checks.h"

namespace stackwise::quant {
namespace {

__constant__ float kNf4CodeDev[16] = STACKWISE_NF4_CODE_VALUES;

template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ x, int64_t blocks, int block,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float mids[15];
  if (threadIdx.x < 15) mids[threadIdx.x] = nf4_midpoint(kNf4CodeDev, threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t b = warp; b < blocks; b += warps) {
    const T* xb = x + b * block;
    float am = 0.0f;
    for (int i = lane; i < block; i += 32) am = absmax_step(am, static_cast<float>(xb[i]));
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      am = absmax_step(am, __shfl_xor_sync(0xffffffffu, am, off));
    am = finite_absmax_or_nan(am);
    if (lane == 0) absmax[b] = am;
    const float inv = nf4_inv_scale(am);
    uint8_t* pb = packed + b * block / 2;
    for (int i = lane; i < block / 2; i += 32) {
      const uint8_t hi = nf4_encode(clamp_unit(static_cast<float>(xb[2 * i]) * inv), mids);
      const uint8_t lo = nf4_encode(clamp_unit(static_cast<float>(xb[2 * i + 1]) * inv), mids);
      pb[i] = pack_nibbles(hi, lo);
    }
  }
}

template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                      const float* __restrict__ absmax, int64_t nbytes, int block,
                                      T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int half_block = block / 2;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nbytes; i += stride) {
    const uint8_t byte = packed[i];
    const float am = absmax[i / half_block];
    out[2 * i] = static_cast<T>(kNf4CodeDev[byte >> 4] * am);
    out[2 * i + 1] = static_cast<T>(kNf4CodeDev[byte & 0xF] * am);
  }
}

constexpr int kRowThreads = 256;

// One block per row: absmax by block reduction, then encode with `Encode(value, scale)`.
template <typename T, typename Q, typename Encode>
__global__ void rows_quantize_kernel(const T* __restrict__ x, int64_t d, float qmax,
                                     Q* __restrict__ q, float* __restrict__ scale, Encode encode) {
  __shared__ float partial[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  float am = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    am = absmax_step(am, static_cast<float>(xr[i]));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) am = absmax_step(am, __shfl_xor_sync(0xffffffffu, am, off));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = am;
  __syncthreads();
  if (threadIdx.x < 32) {
    am = threadIdx.x < kRowThreads / 32 ? partial[threadIdx.x] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      am = absmax_step(am, __shfl_xor_sync(0xffffffffu, am, off));
    if (threadIdx.x == 0) partial[0] = finite_absmax_or_nan(am);
  }
  __syncthreads();
  const float s = partial[0] / qmax;
  if (threadIdx.x == 0) scale[r] = s;
  Q* qr = q + r * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) qr[i] = encode(static_cast<float>(xr[i]), s);
}

struct Int8Encode {
  __device__ int8_t operator()(float v, float s) const { return int8_encode(v, s); }
};

template <typename Q>
struct Fp8Encode {
  float fmax;
  __device__ Q operator()(float v, float s) const {
    float r = s > 0.0f ? v / s : 0.0f;
    r = fminf(fmaxf(r, -fmax), fmax);
    return static_cast<Q>(r);
  }
};

template <typename Q, typename T>
__global__ void rows_dequantize_kernel(const Q* __restrict__ q, const float* __restrict__ scale,
                                       int64_t rows, int64_t d, T* __restrict__ out) {
  const int64_t n = rows * d;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<T>(static_cast<float>(q[i]) * scale[i / d]);
  }
}

constexpr int kThreads = 256;

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& x, int64_t block_size) {
  check_quantize_nf4(x, block_size);
  check_device_type(x, at::kCUDA, "quantize_nf4", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor packed = at::empty({xc.numel() / 2}, xc.options().dtype(at::kByte));
  const int64_t blocks = xc.numel() / block_size;
  at::Tensor absmax = at::empty({blocks}, xc.options().dtype(at::kFloat));
  if (blocks == 0) return {packed, absmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "quantize_nf4_cuda", [&] {
    const int64_t grid = cuda::elementwise_blocks(blocks * 32, kThreads);
    nf4_quantize_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), blocks, int(block_size), packed.mutable_data_ptr<uint8_t>(),
        absmax.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

}  // namespace

void nf4_dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t block_size, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t nbytes = packed.numel();
  if (nbytes == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_nf4_cuda", [&] {
    const int64_t grid = cuda::elementwise_blocks(nbytes, kThreads);
    nf4_dequantize_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), nbytes, int(block_size),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rows_dequantize_into_cuda(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = q.size(0), d = q.size(1);
  if (rows * d == 0) return;
  const int64_t grid = cuda::elementwise_blocks(rows * d, kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_rows_cuda", [&] {
    auto launch = [&](const auto* qp) {
      using q_t = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
      rows_dequantize_kernel<q_t, scalar_t><<<grid, kThreads, 0, stream>>>(
          qp, scale.const_data_ptr<float>(), rows, d, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (q.scalar_type()) {
      case at::kChar:
        launch(q.const_data_ptr<int8_t>());
        break;
      case at::kFloat8_e4m3fn:
        launch(q.const_data_ptr<c10::Float8_e4m3fn>());
        break;
      case at::kFloat8_e5m2:
        launch(q.const_data_ptr<c10::Float8_e5m2>());
        break;
      default:
        TORCH_CHECK(false, "dequantize: unsupported code dtype ", q.scalar_type());
    }
  });
}

namespace {

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               at::IntArrayRef shape, int64_t block_size, at::ScalarType dtype) {
  check_dequantize_nf4(packed, absmax, shape, block_size, dtype);
  check_device_type(packed, at::kCUDA, "dequantize_nf4", "packed");
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  nf4_dequantize_into_cuda(packed.contiguous(), absmax.contiguous(), block_size, out);
  return out;
}

template <typename Q, typename Encode>
void launch_rows_quantize(const at::Tensor& xc, float qmax, at::Tensor& q, at::Tensor& scale,
                          Encode encode) {
  const int64_t rows = xc.size(0), d = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "quantize_rows_cuda", [&] {
    rows_quantize_kernel<scalar_t, Q><<<rows, kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), d, qmax, q.mutable_data_ptr<Q>(),
        scale.mutable_data_ptr<float>(), encode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x) {
  check_rows_input(x, "quantize_int8");
  check_device_type(x, at::kCUDA, "quantize_int8", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  at::Tensor scale = at::zeros({xc.size(0)}, xc.options().dtype(at::kFloat));
  if (xc.numel() > 0) launch_rows_quantize<int8_t>(xc, kInt8Max, q, scale, Int8Encode{});
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, at::ScalarType fp8) {
  check_rows_input(x, "quantize_fp8");
  check_device_type(x, at::kCUDA, "quantize_fp8", "x");
  TORCH_CHECK_TYPE(is_fp8(fp8), "quantize_fp8: fp8_dtype must be float8_e4m3fn or float8_e5m2, got ",
                   fp8);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(fp8));
  at::Tensor scale = at::zeros({xc.size(0)}, xc.options().dtype(at::kFloat));
  if (xc.numel() == 0) return {q, scale};
  if (fp8 == at::kFloat8_e4m3fn) {
    launch_rows_quantize<c10::Float8_e4m3fn>(xc, kFp8E4m3Max, q, scale,
                                             Fp8Encode<c10::Float8_e4m3fn>{kFp8E4m3Max});
  } else {
    launch_rows_quantize<c10::Float8_e5m2>(xc, kFp8E5m2Max, q, scale,
                                           Fp8Encode<c10::Float8_e5m2>{kFp8E5m2Max});
  }
  return {q, scale};
}

at::Tensor dequantize_rows_cuda(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype,
                                const char* op) {
  check_rows_dequantize(q, scale, dtype, op);
  check_device_type(q, at::kCUDA, op, "q");
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  rows_dequantize_into_cuda(q.contiguous(), scale.contiguous(), out);
  return out;
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "dequantize_int8: q must be int8, got ",
                   q.scalar_type());
  return dequantize_rows_cuda(q, scale, dtype, "dequantize_int8");
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_fp8(q.scalar_type()),
                   "dequantize_fp8: q must be float8_e4m3fn or float8_e5m2, got ", q.scalar_type());
  return dequantize_rows_cuda(q, scale, dtype, "dequantize_fp8");
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
  m.impl("quantize_fp8", &quantize_fp8_cuda);
  m.impl("dequantize_fp8", &dequantize_fp8_cuda);
}

}  // namespace stackwise::quant
