// Quantization CPU kernels: NF4 blockwise, int8 and fp8 per row (formats in
// stackwise/quant_formats.h). Compiled once per ISA; the loops are written so the compiler
// vectorizes them (the NF4 code search is 15 compare-adds, branch-free).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant_kernels.h"
#include "stackwise/quant_formats.h"

namespace stackwise::cpu::CPU_CAPABILITY {
namespace {

constexpr float kNf4Code[16] = STACKWISE_NF4_CODE_VALUES;

// Rows of x up to which the fused NF4 matmul beats dequantize-then-BLAS (see quantized_linear).
constexpr int64_t kSmallRows = 16;

struct Nf4Midpoints {
  float m[15];
  Nf4Midpoints() {
    for (int i = 0; i < 15; ++i) m[i] = quant::nf4_midpoint(kNf4Code, i);
  }
};

const Nf4Midpoints& midpoints() {
  static const Nf4Midpoints mids;
  return mids;
}

// Blocks (or rows) per parallel task: ~64K elements each.
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, elems_per_item));
}

template <typename T>
void nf4_quantize_blocks(const T* x, int64_t block, int64_t b0, int64_t b1, uint8_t* packed,
                         float* absmax) {
  const float* mids = midpoints().m;
  // Scratch for one block's codes, so the code search loop has no loop-carried dependence.
  uint8_t codes[quant::kNf4MaxBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * block;
    float am = 0.0f;
    for (int64_t i = 0; i < block; ++i) am = quant::absmax_step(am, static_cast<float>(xb[i]));
    am = quant::finite_absmax_or_nan(am);
    absmax[b] = am;
    const float inv = quant::nf4_inv_scale(am);
    for (int64_t i = 0; i < block; ++i) {
      const float s = quant::clamp_unit(static_cast<float>(xb[i]) * inv);
      uint8_t q = 0;
      for (int j = 0; j < 15; ++j) q += (mids[j] < s) ? 1 : 0;
      codes[i] = q;
    }
    uint8_t* pb = packed + b * block / 2;
    for (int64_t i = 0; i < block / 2; ++i) pb[i] = quant::pack_nibbles(codes[2 * i], codes[2 * i + 1]);
  }
}

template <typename T>
void nf4_dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t block, int64_t b0,
                           int64_t b1, T* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const float am = absmax[b];
    float lut[16];
    for (int j = 0; j < 16; ++j) lut[j] = kNf4Code[j] * am;
    const uint8_t* pb = packed + b * block / 2;
    T* ob = out + b * block;
    for (int64_t i = 0; i < block / 2; ++i) {
      const uint8_t byte = pb[i];
      ob[2 * i] = static_cast<T>(lut[byte >> 4]);
      ob[2 * i + 1] = static_cast<T>(lut[byte & 0xF]);
    }
  }
}

template <typename T>
float row_absmax(const T* x, int64_t d) {
  float am = 0.0f;
  for (int64_t i = 0; i < d; ++i) am = quant::absmax_step(am, static_cast<float>(x[i]));
  return quant::finite_absmax_or_nan(am);
}

// Decodes 64 NF4 weights (32 packed bytes) with the block's scaled code book `lut`.
inline void decode64(const uint8_t* p, const float* lut, float* w) {
  for (int i = 0; i < 32; ++i) {
    w[2 * i] = lut[p[i] >> 4];
    w[2 * i + 1] = lut[p[i] & 0xF];
  }
}

}  // namespace

void nf4_matmul_small_kernel(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& absmax, int64_t block_size, at::Tensor& y) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t m_rows = x.size(0), k = x.size(1), n_cols = y.size(1);
  TORCH_CHECK(m_rows <= kSmallRows && k % block_size == 0 && block_size % 64 == 0);
  const float* xp = x.const_data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks_per_row = k / block_size;
  at::parallel_for(0, n_cols, 16, [&](int64_t n0, int64_t n1) {
    alignas(64) float w[64];
    float lut[16];
    for (int64_t n = n0; n < n1; ++n) {
      Vec acc[kSmallRows];
      for (int64_t m = 0; m < m_rows; ++m) acc[m] = Vec(0.0f);
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        const int64_t blk = n * blocks_per_row + b;
        const float am = ap[blk];
        for (int j = 0; j < 16; ++j) lut[j] = kNf4Code[j] * am;
        for (int64_t c = 0; c < block_size; c += 64) {
          decode64(pp + (blk * block_size + c) / 2, lut, w);
          const int64_t k0 = b * block_size + c;
          for (int64_t m = 0; m < m_rows; ++m) {
            const float* xr = xp + m * k + k0;
            for (int j = 0; j < 64; j += Vec::size()) {
              acc[m] = at::vec::fmadd(Vec::loadu(xr + j), Vec::loadu(w + j), acc[m]);
            }
          }
        }
      }
      for (int64_t m = 0; m < m_rows; ++m) {
        yp[m * n_cols + n] =
            at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m]);
      }
    }
  });
}

void nf4_matmul_small_backward_kernel(const at::Tensor& g, const at::Tensor& packed,
                                      const at::Tensor& absmax, int64_t block_size,
                                      at::Tensor& gx) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t m_rows = g.size(0), n_cols = g.size(1), k = gx.size(1);
  TORCH_CHECK(m_rows <= kSmallRows && k % block_size == 0 && block_size % 64 == 0);
  const float* gp = g.const_data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  const int64_t blocks_per_row = k / block_size;
  // One partial gx per thread, summed at the end in thread order (deterministic).
  const int threads = at::get_num_threads();
  std::vector<float> partial(size_t(threads) * m_rows * k, 0.0f);
  at::parallel_for(0, n_cols, 16, [&](int64_t n0, int64_t n1) {
    float* acc = partial.data() + size_t(at::get_thread_num()) * m_rows * k;
    alignas(64) float w[64];
    float lut[16];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        const int64_t blk = n * blocks_per_row + b;
        const float am = ap[blk];
        for (int j = 0; j < 16; ++j) lut[j] = kNf4Code[j] * am;
        for (int64_t c = 0; c < block_size; c += 64) {
          decode64(pp + (blk * block_size + c) / 2, lut, w);
          const int64_t k0 = b * block_size + c;
          for (int64_t m = 0; m < m_rows; ++m) {
            const Vec gv(gp[m * n_cols + n]);
            float* ar = acc + m * k + k0;
            for (int j = 0; j < 64; j += Vec::size()) {
              at::vec::fmadd(gv, Vec::loadu(w + j), Vec::loadu(ar + j)).store(ar + j);
            }
          }
        }
      }
    }
  });
  float* out = gx.mutable_data_ptr<float>();
  const int64_t total = m_rows * k;
  at::parallel_for(0, total, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float s = 0.0f;
      for (int t = 0; t < threads; ++t) s += partial[size_t(t) * total + i];
      out[i] = s;
    }
  });
}

void nf4_quantize_kernel(const at::Tensor& x, int64_t block_size, at::Tensor& packed,
                         at::Tensor& absmax) {
  const int64_t blocks = x.numel() / block_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_nf4_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
    float* ap = absmax.mutable_data_ptr<float>();
    at::parallel_for(0, blocks, grain_for(block_size), [&](int64_t b0, int64_t b1) {
      nf4_quantize_blocks(xp, block_size, b0, b1, pp, ap);
    });
  });
}

void nf4_dequantize_kernel(const at::Tensor& packed, const at::Tensor& absmax, int64_t block_size,
                           at::Tensor& out) {
  const int64_t blocks = out.numel() / block_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_nf4_cpu", [&] {
    const uint8_t* pp = packed.const_data_ptr<uint8_t>();
    const float* ap = absmax.const_data_ptr<float>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_for(block_size), [&](int64_t b0, int64_t b1) {
      nf4_dequantize_blocks(pp, ap, block_size, b0, b1, op);
    });
  });
}

void int8_quantize_rows_kernel(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  const int64_t rows = x.size(0), d = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_int8_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int8_t* qp = q.mutable_data_ptr<int8_t>();
    float* sp = scale.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain_for(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * d;
        const float s = row_absmax(xr, d) / quant::kInt8Max;
        sp[r] = s;
        int8_t* qr = qp + r * d;
        for (int64_t i = 0; i < d; ++i) qr[i] = quant::int8_encode(static_cast<float>(xr[i]), s);
      }
    });
  });
}

void fp8_quantize_rows_kernel(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  const int64_t rows = x.size(0), d = x.size(1);
  const bool e4m3 = q.scalar_type() == at::kFloat8_e4m3fn;
  const float fmax = e4m3 ? quant::kFp8E4m3Max : quant::kFp8E5m2Max;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_fp8_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    float* sp = scale.mutable_data_ptr<float>();
    auto run = [&](auto* qp) {
      using q_t = std::remove_pointer_t<decltype(qp)>;
      at::parallel_for(0, rows, grain_for(d), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * d;
          const float s = row_absmax(xr, d) / fmax;
          sp[r] = s;
          q_t* qr = qp + r * d;
          for (int64_t i = 0; i < d; ++i) {
            float v = s > 0.0f ? static_cast<float>(xr[i]) / s : 0.0f;
            v = std::min(std::max(v, -fmax), fmax);
            qr[i] = static_cast<q_t>(v);
          }
        }
      });
    };
    if (e4m3) {
      run(q.mutable_data_ptr<c10::Float8_e4m3fn>());
    } else {
      run(q.mutable_data_ptr<c10::Float8_e5m2>());
    }
  });
}

void rows_dequantize_kernel(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  const int64_t rows = q.size(0), d = q.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_rows_cpu", [&] {
    const float* sp = scale.const_data_ptr<float>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* qp) {
      at::parallel_for(0, rows, grain_for(d), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float s = sp[r];
          for (int64_t i = 0; i < d; ++i) {
            op[r * d + i] = static_cast<scalar_t>(static_cast<float>(qp[r * d + i]) * s);
          }
        }
      });
    };
    switch (q.scalar_type()) {
      case at::kChar:
        run(q.const_data_ptr<int8_t>());
        break;
      case at::kFloat8_e4m3fn:
        run(q.const_data_ptr<c10::Float8_e4m3fn>());
        break;
      case at::kFloat8_e5m2:
        run(q.const_data_ptr<c10::Float8_e5m2>());
        break;
      default:
        TORCH_CHECK(false, "dequantize: unsupported code dtype ", q.scalar_type());
    }
  });
}

}  // namespace stackwise::cpu::CPU_CAPABILITY
