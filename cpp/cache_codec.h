// Converting tensors to and from activation-cache records (stackwise/spill_format.h) at a storage
// precision: as-is, fp16, bf16, int8 or fp8 (e4m3), the last two with one float32 absmax scale
// per row (row = last dimension) through the stackwise quantization ops
// (formats in stackwise/quant_formats.h). ATen only; used by the _C binding of the store.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "stackwise/spill_format.h"

namespace stackwise::cache {

// What a lossy storage precision changed: the largest |x - stored| and the squared-error sum.
struct ErrorStats {
  double max_abs = 0.0, sum_sq = 0.0;
  uint64_t count = 0;
  void merge(const ErrorStats& o) {
    max_abs = max_abs > o.max_abs ? max_abs : o.max_abs;
    sum_sq += o.sum_sq;
    count += o.count;
  }
};

core::DType dtype_code(at::ScalarType t);  // throws c10::TypeError for an unsupported dtype
at::ScalarType scalar_type(core::DType d);
core::Storage parse_storage(const std::string& name);  // throws c10::ValueError

// The storage a tensor of dtype t actually gets when `requested` is asked for: lossy formats
// apply to floating tensors only, and storing fp16 as fp16 is as-is.
core::Storage effective_storage(at::ScalarType t, core::Storage requested, int64_t numel);

// Encodes x (CPU or CUDA) into a record whose payload comes from `alloc` (host memory). On CUDA
// the conversion runs on the device and the bytes move on a side stream ordered after the
// current stream by an event; the call returns once they are on the host. With `error` set and
// a lossy storage, the error introduced is accumulated there.
core::TensorRecord encode(const std::string& name, const at::Tensor& x, core::Storage storage,
                          core::BlobAllocator alloc, void* alloc_ctx, ErrorStats* error);

// A new tensor on `device` holding the record's values in its original dtype. To CUDA, the
// (compressed) payload is staged in pinned memory, copied asynchronously on the current stream
// and decoded there. CPU results of as-is and fp16/bf16 records live in memory from `alloc`.
at::Tensor decode(const core::TensorRecord& r, const at::Device& device,
                  core::BlobAllocator alloc = nullptr, void* alloc_ctx = nullptr);

}  // namespace stackwise::cache
