# Finds the torch installation of the Python interpreter that drives the build and exposes it as
# the imported target `stackwise::torch` (plus `stackwise::torch_cuda` when torch is a CUDA build).
#
# Why not find_package(Torch): torch's CMake config insists on finding the CUDA toolkit whenever
# torch itself is a CUDA build ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA
# libraries"), even when we build CPU kernels only, and it needs several cache variables pointed at
# pip wheels. The compile flags and libraries an extension needs are few and stable (they are what
# torch.utils.cpp_extension uses), so we read them from the interpreter instead.
#
# Outputs:
#   STACKWISE_TORCH_VERSION       e.g. 2.14.1+cu130
#   STACKWISE_TORCH_CUDA_VERSION  e.g. 13.0, or empty for a CPU build of torch
#   STACKWISE_TORCH_LIB_DIR       torch/lib
#   STACKWISE_NVIDIA_WHEEL_ROOT   site-packages/nvidia/cu<major> when the NVIDIA wheels are present

if(NOT Python3_EXECUTABLE)
  message(FATAL_ERROR "stackwise: Python3_EXECUTABLE is not set; build through setup.py or pass it")
endif()

execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
"import os, sys, sysconfig
import torch
print(torch.__version__)
print(torch.version.cuda or '')
print(os.path.join(os.path.dirname(torch.__file__), 'include'))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(sysconfig.get_paths()['purelib'])
print(int(torch.backends.openmp.is_available()))
"
  OUTPUT_VARIABLE _sw_torch_out
  ERROR_VARIABLE _sw_torch_err
  RESULT_VARIABLE _sw_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _sw_torch_rc EQUAL 0)
  string(REGEX REPLACE "\n" " " _sw_torch_err "${_sw_torch_err}")
  message(FATAL_ERROR "stackwise: cannot import torch with ${Python3_EXECUTABLE}: ${_sw_torch_err}")
endif()
string(REPLACE "\n" ";" _sw_torch_lines "${_sw_torch_out}")
list(GET _sw_torch_lines 0 STACKWISE_TORCH_VERSION)
list(GET _sw_torch_lines 1 STACKWISE_TORCH_CUDA_VERSION)
list(GET _sw_torch_lines 2 _sw_torch_include)
list(GET _sw_torch_lines 3 STACKWISE_TORCH_LIB_DIR)
list(GET _sw_torch_lines 4 _sw_torch_abi)
list(GET _sw_torch_lines 5 _sw_site_packages)
list(GET _sw_torch_lines 6 _sw_torch_openmp)
message(STATUS "stackwise: torch ${STACKWISE_TORCH_VERSION} (CUDA '${STACKWISE_TORCH_CUDA_VERSION}') at ${STACKWISE_TORCH_LIB_DIR}")

function(_sw_torch_library out name)
  find_library(_sw_lib_${name} NAMES ${name} PATHS "${STACKWISE_TORCH_LIB_DIR}" NO_DEFAULT_PATH)
  if(NOT _sw_lib_${name})
    message(FATAL_ERROR "stackwise: lib${name}.so not found in ${STACKWISE_TORCH_LIB_DIR}")
  endif()
  set(${out} "${_sw_lib_${name}}" PARENT_SCOPE)
endfunction()

_sw_torch_library(_sw_c10 c10)
_sw_torch_library(_sw_torch_cpu torch_cpu)
_sw_torch_library(_sw_torch torch)

add_library(stackwise::torch INTERFACE IMPORTED GLOBAL)
target_include_directories(stackwise::torch SYSTEM INTERFACE
  "${_sw_torch_include}" "${_sw_torch_include}/torch/csrc/api/include")
target_compile_definitions(stackwise::torch INTERFACE
  _GLIBCXX_USE_CXX11_ABI=${_sw_torch_abi})
target_link_libraries(stackwise::torch INTERFACE "${_sw_c10}" "${_sw_torch_cpu}" "${_sw_torch}")

# at::parallel_for is a header template: with torch's OpenMP backend it parallelises only in
# files compiled with -fopenmp (without it every "parallel" loop silently runs on one thread).
# Link the libgomp torch ships (same soname), so one OpenMP runtime serves both.
if(_sw_torch_openmp)
  set(_sw_gomp "")
  foreach(_cand "${STACKWISE_TORCH_LIB_DIR}/libgomp.so.1" "${STACKWISE_TORCH_LIB_DIR}/libgomp.so")
    if(EXISTS "${_cand}")
      set(_sw_gomp "${_cand}")
      break()
    endif()
  endforeach()
  if(NOT _sw_gomp)
    find_package(OpenMP REQUIRED COMPONENTS CXX)
    set(_sw_gomp OpenMP::OpenMP_CXX)
  endif()
  target_compile_options(stackwise::torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  target_link_libraries(stackwise::torch INTERFACE "${_sw_gomp}")
  message(STATUS "stackwise: OpenMP on (${_sw_gomp})")
else()
  message(STATUS "stackwise: torch is not built with OpenMP; at::parallel_for uses torch's own pool")
endif()

# libtorch_python: only the pybind11 module links it (tensor type casters).
_sw_torch_library(STACKWISE_TORCH_PYTHON_LIBRARY torch_python)

# The NVIDIA pip wheels (nvidia/cu13/...) carry the math-library headers (cublas_v2.h,
# cusparse.h, ...) that ATen's CUDA headers include and that a bare nvcc install lacks.
set(STACKWISE_NVIDIA_WHEEL_ROOT "")
if(STACKWISE_TORCH_CUDA_VERSION)
  string(REGEX MATCH "^[0-9]+" _sw_torch_cuda_major "${STACKWISE_TORCH_CUDA_VERSION}")
  foreach(_cand "${_sw_site_packages}/nvidia/cu${_sw_torch_cuda_major}" "${_sw_site_packages}/nvidia")
    if(EXISTS "${_cand}/include/cublas_v2.h")
      set(STACKWISE_NVIDIA_WHEEL_ROOT "${_cand}")
      break()
    endif()
  endforeach()
endif()
