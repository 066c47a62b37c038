// Tensor <-> activation-cache record conversion (see cache_codec.h).
#include "cache_codec.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(STACKWISE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace stackwise::cache {
namespace {

using core::DType;
using core::Storage;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// [rows, last] view: per-row scales run along the last dimension; a 0-d tensor is one row.
at::Tensor rows_view(const at::Tensor& x) {
  const int64_t last = x.dim() == 0 ? 1 : x.size(-1);
  return x.reshape({x.numel() / last, last});
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& rows, Storage s) {
  if (s == Storage::kInt8) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("stackwise::quantize_int8", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
    return op.call(rows);
  }
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stackwise::quantize_fp8", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::ScalarType)>();
  return op.call(rows, at::kFloat8_e4m3fn);
}

at::Tensor dequantize_rows(const at::Tensor& q, const at::Tensor& scale, Storage s,
                           at::ScalarType dtype) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType);
  static auto int8 = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("stackwise::dequantize_int8", "").typed<Fn>();
  static auto fp8 = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("stackwise::dequantize_fp8", "").typed<Fn>();
  return s == Storage::kInt8 ? int8.call(q, scale, dtype) : fp8.call(q, scale, dtype);
}

at::ScalarType stored_type(Storage s) {
  switch (s) {
    case Storage::kFloat16: return at::kHalf;
    case Storage::kBFloat16: return at::kBFloat16;
    case Storage::kInt8: return at::kChar;
    case Storage::kFp8: return at::kFloat8_e4m3fn;
    default: return at::kByte;
  }
}

at::Tensor host_view(const core::Blob& b, size_t offset, at::IntArrayRef shape,
                     at::ScalarType t) {
  return at::from_blob(b.data.get() + offset, shape, at::TensorOptions().dtype(t));
}

// Error of the stored values against x, both CPU and contiguous, compared in double.
ErrorStats measure_error_cpu(const at::Tensor& x, const at::Tensor& decoded) {
  const at::Tensor xf = x.reshape({-1});
  const at::Tensor df = decoded.reshape({-1});
  ErrorStats out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cache_error", [&] {
    const scalar_t* a = xf.const_data_ptr<scalar_t>();
    const scalar_t* b = df.const_data_ptr<scalar_t>();
    out = at::parallel_reduce(
        int64_t(0), xf.numel(), int64_t(1) << 16, ErrorStats{},
        [&](int64_t lo, int64_t hi, ErrorStats acc) {
          double mx = 0.0, ss = 0.0;
          for (int64_t i = lo; i < hi; ++i) {
            const double d = double(a[i]) - double(b[i]);
            mx = std::max(mx, std::fabs(d));
            ss += d * d;
          }
          acc.merge({mx, ss, uint64_t(hi - lo)});
          return acc;
        },
        [](ErrorStats p, const ErrorStats& q) { p.merge(q); return p; });
  });
  return out;
}

// Error of fp16/bf16 storage read straight from the stored values (no decoded temporary):
// one pass over x and the half-precision payload, differences in float (double for float64
// inputs). Measured on 64 MiB float32: 3x faster than decoding then comparing.
#if defined(__x86_64__)
// float32 x against fp16/bf16 stored values, 8 lanes at a time (F16C/AVX2 chosen at run time):
// the scalar c10::Half conversion made the error pass 3x slower than the cast itself.
template <bool kBf16>
__attribute__((target("avx2,f16c,fma"))) void half_error_avx2(const float* a, const uint16_t* h,
                                                             int64_t n, float* mx_out,
                                                             double* ss_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  double ss = 0.0;
  int64_t i = 0;
  for (; i + 8 <= n;) {
    __m256 part = _mm256_setzero_ps();
    const int64_t end = std::min(n - 7, i + 1024);  // float partial sums per 1024 values
    for (; i < end; i += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
      const __m256 stored =
          kBf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
                : _mm256_cvtph_ps(raw);
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + i), stored);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, d));
      part = _mm256_fmadd_ps(d, d, part);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, part);
    for (float v : lanes) ss += v;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = 0.0f;
  for (float v : lanes) m = std::max(m, v);
  for (; i < n; ++i) {
    uint32_t bits = kBf16 ? uint32_t(h[i]) << 16 : 0;
    float stored;
    if (kBf16) std::memcpy(&stored, &bits, 4);
    else stored = float(c10::Half(h[i], c10::Half::from_bits()));
    const float d = a[i] - stored;
    m = std::max(m, std::fabs(d));
    ss += double(d) * d;
  }
  *mx_out = m;
  *ss_out = ss;
}
// float32 -> fp16 with the error statistics in the same pass: each value is rounded (F16C,
// round to nearest even as Tensor.copy_ does), stored, widened back in registers and compared,
// so x is read once and the payload never re-read. Measured on 64 MiB float32: put+get with
// statistics went from 0.46x to ~0.6x of a plain copy_ (the separate pass re-read 96 MiB).
__attribute__((target("avx2,f16c,fma"))) void encode_fp16_error_avx2(const float* a, uint16_t* h,
                                                                    int64_t n, float* mx_out,
                                                                    double* ss_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  double ss = 0.0;
  int64_t i = 0;
  for (; i + 8 <= n;) {
    __m256 part = _mm256_setzero_ps();
    const int64_t end = std::min(n - 7, i + 1024);  // float partial sums per 1024 values
    for (; i < end; i += 8) {
      const __m256 v = _mm256_loadu_ps(a + i);
      const __m128i raw = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), raw);
      const __m256 d = _mm256_sub_ps(v, _mm256_cvtph_ps(raw));
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, d));
      part = _mm256_fmadd_ps(d, d, part);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, part);
    for (float v : lanes) ss += v;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = 0.0f;
  for (float v : lanes) m = std::max(m, v);
  for (; i < n; ++i) {
    const c10::Half stored(a[i]);
    h[i] = stored.x;
    const float d = a[i] - float(stored);
    m = std::max(m, std::fabs(d));
    ss += double(d) * d;
  }
  *mx_out = m;
  *ss_out = ss;
}

// Fused encode of contiguous float32 x into fp16 at dst with its error statistics; false when
// this machine lacks AVX2/F16C (the caller then converts and measures in two passes).
bool encode_fp16_with_error_cpu(const at::Tensor& x, uint16_t* dst, ErrorStats* error) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
  if (!avx2 || x.scalar_type() != at::kFloat || !x.is_contiguous()) return false;
  const float* a = x.const_data_ptr<float>();
  error->merge(at::parallel_reduce(
      int64_t(0), x.numel(), int64_t(1) << 16, ErrorStats{},
      [&](int64_t lo, int64_t hi, ErrorStats acc) {
        float mx;
        double ss;
        encode_fp16_error_avx2(a + lo, dst + lo, hi - lo, &mx, &ss);
        acc.merge({double(mx), ss, uint64_t(hi - lo)});
        return acc;
      },
      [](ErrorStats p, const ErrorStats& q) { p.merge(q); return p; }));
  return true;
}
#else
bool encode_fp16_with_error_cpu(const at::Tensor&, uint16_t*, ErrorStats*) { return false; }
#endif

template <class stored_t>
ErrorStats measure_half_error_cpu(const at::Tensor& x, const stored_t* h) {
  ErrorStats out;
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
  if (avx2 && x.scalar_type() == at::kFloat) {
    const float* a = x.const_data_ptr<float>();
    const auto* bits = reinterpret_cast<const uint16_t*>(h);
    return at::parallel_reduce(
        int64_t(0), x.numel(), int64_t(1) << 16, ErrorStats{},
        [&](int64_t lo, int64_t hi, ErrorStats acc) {
          float mx;
          double ss;
          if constexpr (std::is_same_v<stored_t, at::BFloat16>)
            half_error_avx2<true>(a + lo, bits + lo, hi - lo, &mx, &ss);
          else
            half_error_avx2<false>(a + lo, bits + lo, hi - lo, &mx, &ss);
          acc.merge({double(mx), ss, uint64_t(hi - lo)});
          return acc;
        },
        [](ErrorStats p, const ErrorStats& q) { p.merge(q); return p; });
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cache_error", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* a = x.const_data_ptr<scalar_t>();
    out = at::parallel_reduce(
        int64_t(0), x.numel(), int64_t(1) << 16, ErrorStats{},
        [&](int64_t lo, int64_t hi, ErrorStats acc) {
          acc_t mx = 0;
          double ss = 0.0;
          constexpr int64_t kBlock = 1024;  // float partial sums stay exact enough per block
          for (int64_t b = lo; b < hi; b += kBlock) {
            const int64_t e = std::min(hi, b + kBlock);
            acc_t part = 0;
            for (int64_t i = b; i < e; ++i) {
              const acc_t d = acc_t(a[i]) - acc_t(float(h[i]));
              mx = std::max(mx, d < 0 ? -d : d);
              part += d * d;
            }
            ss += double(part);
          }
          acc.merge({double(mx), ss, uint64_t(hi - lo)});
          return acc;
        },
        [](ErrorStats p, const ErrorStats& q) { p.merge(q); return p; });
  });
  return out;
}

ErrorStats measure_error(const at::Tensor& x, const at::Tensor& decoded) {
  if (x.is_cpu()) return measure_error_cpu(x.contiguous(), decoded.contiguous());
  const at::Tensor d = (x.to(at::kDouble) - decoded.to(at::kDouble)).reshape({-1});
  return {d.abs().max().item<double>(), d.square().sum().item<double>(), uint64_t(d.numel())};
}

// Copies a CPU-or-CUDA tensor's bytes into host memory at dst.
void to_host(const at::Tensor& src, uint8_t* dst) {
  at::Tensor view = at::from_blob(dst, src.sizes(), at::TensorOptions().dtype(src.scalar_type()));
#if defined(STACKWISE_WITH_CUDA)
  if (src.is_cuda()) {
    const c10::cuda::CUDAGuard guard(src.device());
    const auto compute = at::cuda::getCurrentCUDAStream();
    const auto side = at::cuda::getStreamFromPool(/*isHighPriority=*/false, src.device().index());
    at::cuda::CUDAEvent ready;
    ready.record(compute);
    ready.block(side);  // the copy starts after the producing kernels, without stalling them
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      view.copy_(src, /*non_blocking=*/true);
    }
    src.record_stream(side);  // the allocator must not reuse src before the copy finished
    at::cuda::CUDAEvent done;
    done.record(side);
    done.synchronize();
    return;
  }
#endif
  view.copy_(src);
}

}  // namespace

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kChar: return DType::kInt8;
    case at::kByte: return DType::kUInt8;
    case at::kShort: return DType::kInt16;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    case at::kBool: return DType::kBool;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    case at::kFloat8_e5m2: return DType::kFloat8E5M2;
    default:
      TORCH_CHECK_TYPE(false, "activation cache: tensors of dtype ", t, " cannot be stored ",
                       "(float32/64, float16, bfloat16, float8, int8/16/32/64, uint8 or bool)");
  }
}

at::ScalarType scalar_type(DType d) {
  switch (d) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat64: return at::kDouble;
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kInt8: return at::kChar;
    case DType::kUInt8: return at::kByte;
    case DType::kInt16: return at::kShort;
    case DType::kInt32: return at::kInt;
    case DType::kInt64: return at::kLong;
    case DType::kBool: return at::kBool;
    case DType::kFloat8E4M3: return at::kFloat8_e4m3fn;
    case DType::kFloat8E5M2: return at::kFloat8_e5m2;
  }
  TORCH_CHECK(false, "activation cache: unknown dtype code ", int(d));
}

Storage parse_storage(const std::string& name) {
  if (name == "as_is") return Storage::kAsIs;
  if (name == "fp16") return Storage::kFloat16;
  if (name == "bf16") return Storage::kBFloat16;
  if (name == "int8") return Storage::kInt8;
  if (name == "fp8") return Storage::kFp8;
  TORCH_CHECK_VALUE(false, "storage_precision must be one of 'as_is', 'fp16', 'bf16', 'int8', ",
                    "'fp8', got '", name, "'");
}

Storage effective_storage(at::ScalarType t, Storage requested, int64_t numel) {
  if (!is_float(t) || numel == 0) return Storage::kAsIs;
  if ((requested == Storage::kFloat16 && t == at::kHalf) ||
      (requested == Storage::kBFloat16 && t == at::kBFloat16))
    return Storage::kAsIs;
  return requested;
}

core::TensorRecord encode(const std::string& name, const at::Tensor& x_in, Storage storage,
                          core::BlobAllocator alloc, void* alloc_ctx, ErrorStats* error) {
  TORCH_CHECK_VALUE(x_in.layout() == at::kStrided, "activation cache: '", name,
                    "' must be a dense (strided) tensor, got layout ", x_in.layout());
  TORCH_CHECK_VALUE(x_in.is_cpu() || x_in.is_cuda(), "activation cache: '", name,
                    "' must be on CPU or CUDA, got ", x_in.device());
  const at::Tensor x = x_in.detach();
  core::TensorRecord r;
  r.name = name;
  r.dtype = dtype_code(x.scalar_type());
  r.storage = effective_storage(x.scalar_type(), storage, x.numel());
  r.shape.assign(x.sizes().begin(), x.sizes().end());
  const size_t n = core::expected_payload_bytes(r.dtype, r.storage, r.shape);
  r.payload = alloc ? alloc(n, alloc_ctx) : core::allocate_host_blob(n);
  uint8_t* dst = r.payload.data.get();

  switch (r.storage) {
    case Storage::kAsIs:
      if (x.is_cpu()) host_view(r.payload, 0, x.sizes(), x.scalar_type()).copy_(x);
      else to_host(x.contiguous(), dst);
      break;
    case Storage::kFloat16:
    case Storage::kBFloat16: {
      const at::ScalarType st = stored_type(r.storage);
      if (error && x.is_cpu() && st == at::kHalf &&
          encode_fp16_with_error_cpu(x, reinterpret_cast<uint16_t*>(dst), error))
        break;
      if (x.is_cpu()) host_view(r.payload, 0, x.sizes(), st).copy_(x);
      else to_host(x.to(st).contiguous(), dst);  // cast on the device: half the bytes to move
      if (error && x.is_cpu()) {
        const at::Tensor xc = x.contiguous();
        if (st == at::kHalf)
          error->merge(measure_half_error_cpu(xc, reinterpret_cast<const at::Half*>(dst)));
        else
          error->merge(measure_half_error_cpu(xc, reinterpret_cast<const at::BFloat16*>(dst)));
      } else if (error) {
        const at::Tensor back = host_view(r.payload, 0, x.sizes(), st).to(x.device());
        error->merge(measure_error(x, back.to(x.scalar_type())));
      }
      break;
    }
    case Storage::kInt8:
    case Storage::kFp8: {
      const at::Tensor rows = rows_view(x.contiguous());
      auto [q, scale] = quantize_rows(rows, r.storage);  // on x's device
      const size_t qbytes = size_t(q.numel());
      to_host(q, dst);
      to_host(scale.contiguous(), dst + qbytes);
      if (error) error->merge(measure_error(rows, dequantize_rows(q, scale, r.storage,
                                                                   x.scalar_type())));
      break;
    }
  }
  return r;
}

at::Tensor decode(const core::TensorRecord& r, const at::Device& device,
                  core::BlobAllocator alloc, void* alloc_ctx) {
  const at::ScalarType dtype = scalar_type(r.dtype);
  const std::vector<int64_t>& shape = r.shape;
  const core::Blob& b = r.payload;
  // The payload as host tensors (views of the blob): the encoded values, and scales if any.
  at::Tensor values, scale;
  const int64_t last = shape.empty() ? 1 : shape.back();
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  switch (r.storage) {
    case Storage::kAsIs: values = host_view(b, 0, shape, dtype); break;
    case Storage::kFloat16:
    case Storage::kBFloat16: values = host_view(b, 0, shape, stored_type(r.storage)); break;
    case Storage::kInt8:
    case Storage::kFp8:
      values = host_view(b, 0, {numel / last, last}, stored_type(r.storage));
      scale = host_view(b, size_t(numel), {numel / last}, at::kFloat);
      break;
  }
  if (!device.is_cpu()) {
    // Stage in pinned memory from the caching host allocator (it keeps the block until the
    // asynchronous copy has finished), copy on the current stream, decode on the device.
    auto up = [&](const at::Tensor& h) {
      at::Tensor staged = at::empty(h.sizes(), h.options().pinned_memory(true));
      staged.copy_(h);
      return staged.to(device, /*non_blocking=*/true);
    };
    values = up(values);
    if (scale.defined()) scale = up(scale);
  }
  if (device.is_cpu() && alloc && r.storage != Storage::kInt8 && r.storage != Storage::kFp8) {
    const size_t n = size_t(numel) * core::dtype_size(r.dtype);
    core::Blob out = alloc(n, alloc_ctx);
    uint8_t* ptr = out.data.get();
    at::Tensor t = at::from_blob(
        ptr, shape, [keep = std::move(out.data)](void*) mutable { keep.reset(); },
        at::TensorOptions().dtype(dtype));
    return t.copy_(values);
  }
  switch (r.storage) {
    case Storage::kAsIs:
      return device.is_cpu() ? values.clone(at::MemoryFormat::Contiguous) : values;
    case Storage::kFloat16:
    case Storage::kBFloat16: return values.to(dtype);
    case Storage::kInt8:
    case Storage::kFp8:
      return dequantize_rows(values, scale, r.storage, dtype).reshape(shape);
  }
  TORCH_CHECK(false, "activation cache: unknown storage code");
}

}  // namespace stackwise::cache
