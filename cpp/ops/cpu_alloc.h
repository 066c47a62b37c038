// Output allocation for the memory-bound CPU kernels.
//
// A fresh multi-megabyte tensor from the default CPU allocator is mmap'd memory that page-faults
// 4 KiB at a time on first write: for an 8192x4096 fp32 output that costs ~24 ms against ~6 ms
// for the kernel's own traffic (measured with torch 2.14 on a 2-core Xeon, THP in madvise mode).
// Blocks of at least 32 MiB (above glibc's largest dynamic mmap threshold, so always fresh pages)
// are therefore allocated 2 MiB-aligned and marked MADV_HUGEPAGE, which cuts the first-touch cost
// about 4x; smaller blocks come from torch's CPU allocator, whose freed heap memory is reused.
// Tensors stay ordinary, resizable CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

namespace stackwise::cpu {

// Like at::empty(sizes, options) for a contiguous CPU tensor, with huge pages for large blocks.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace stackwise::cpu
