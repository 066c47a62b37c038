// stackwise._C: the pybind11 module. Importing it loads the op registrations linked into it
// (TORCH_LIBRARY in cpp/ops/registration.cpp, kernels in cpp/ops and cuda/), and it exposes
// host-side helpers: build information, the CPU ISA in use, CRC-32C over Python buffers, and the
// activation-cache store (its class in cache_store.cpp, registered here).
#include <pybind11/pybind11.h>
#include <torch/python.h>

#include <cstdint>

#include "cpu_isa.h"
#include "linear_attention_chunked.h"
#include "stackwise/build_info.h"
#include "stackwise/crc32c.h"

namespace py = pybind11;

namespace stackwise::cache {
void register_cache_store(py::module_& m);  // cache_store.cpp
}

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = STACKWISE_BI_VERSION;
  d["torch_version"] = STACKWISE_BI_TORCH_VERSION;
  d["torch_cuda_version"] = STACKWISE_BI_TORCH_CUDA_VERSION;
  d["cuda_built"] = bool(STACKWISE_BI_CUDA_BUILT);
  d["cuda_off_reason"] = STACKWISE_BI_CUDA_OFF_REASON;
  d["nvcc_version"] = STACKWISE_BI_NVCC_VERSION;
  d["cuda_archs"] = STACKWISE_BI_CUDA_ARCHS;
  d["cuda_compiler"] = STACKWISE_BI_CUDA_COMPILER;
  d["cxx_compiler"] = STACKWISE_BI_CXX_COMPILER;
  d["cxx_standard"] = STACKWISE_BI_CXX_STANDARD;
  d["build_type"] = STACKWISE_BI_BUILD_TYPE;
  d["cpu_capabilities"] = STACKWISE_BI_CPU_CAPABILITIES;
  return d;
}

// CRC-32C of any C-contiguous buffer (bytes, bytearray, memoryview, numpy array), continuing
// from `crc`. The GIL is released while the bytes are hashed.
uint32_t crc32c_buffer(const py::buffer& data, uint32_t crc) {
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
  uint32_t out;
  {
    py::gil_scoped_release release;
    out = stackwise::core::crc32c_update(crc, view.buf, static_cast<size_t>(view.len));
  }
  PyBuffer_Release(&view);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stackwise native core: op registrations and host-side helpers";
  m.def("build_info", &build_info, "What this extension was built against and with.");
  m.def("cpu_isa", [] { return stackwise::cpu::isa_name(stackwise::cpu::current_isa()); },
        "The CPU kernel build in use: DEFAULT, AVX2 or AVX512 (follows ATEN_CPU_CAPABILITY).");
  m.def("crc32c", &crc32c_buffer, py::arg("data"), py::arg("crc") = 0u,
        "CRC-32C (Castagnoli) of a contiguous buffer, continuing from `crc`.");
  m.def("crc32c_hardware_accelerated", &stackwise::core::crc32c_hardware_accelerated,
        "True when the SSE4.2 crc32 instruction is used.");
  // The device-generic chunked linear attention that the CUDA dispatch runs, callable on CPU
  // tensors so the tests check its math without a GPU.
  m.def("_linear_attention_chunked", &stackwise::linear_attention_chunked, py::arg("phi_q"),
        py::arg("phi_k"), py::arg("v"), py::arg("causal"), py::arg("eps"),
        py::arg("chunk") = stackwise::kLinearAttentionChunk);
  m.def("_linear_attention_chunked_backward", &stackwise::linear_attention_chunked_backward,
        py::arg("grad_out"), py::arg("phi_q"), py::arg("phi_k"), py::arg("v"), py::arg("causal"),
        py::arg("eps"), py::arg("chunk") = stackwise::kLinearAttentionChunk);
  stackwise::cache::register_cache_store(m);
}
