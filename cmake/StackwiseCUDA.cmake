# The CUDA gate: decides whether the CUDA kernels are compiled, and configures nvcc when they are.
#
#   STACKWISE_BUILD_CUDA=auto  (default) build them when torch is a CUDA build and an nvcc with the
#                              same major version is found; otherwise say why and go on.
#   STACKWISE_BUILD_CUDA=1     build them or fail the configure step with one line saying why.
#   STACKWISE_BUILD_CUDA=0     never build them.
#
# Never looks for a GPU: compiling needs only the toolkit, so CI compiles the kernels on a
# machine without one.
#
# The toolkit root comes from CUDAToolkit_ROOT / CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then
# the nvcc on PATH. `nvcc` on PATH may be a wrapper in /usr/local/bin whose parent is not the
# toolkit root, so a root is accepted only if it holds bin/nvcc and include/cuda_runtime.h.
#
# Architectures come from TORCH_CUDA_ARCH_LIST ("9.0a", "8.0;9.0+PTX", ...), default 9.0a.
#
# Outputs: STACKWISE_WITH_CUDA (ON/OFF), STACKWISE_CUDA_OFF_REASON, STACKWISE_CUDA_ARCHS,
#          STACKWISE_NVCC_VERSION, STACKWISE_CUDA_ROOT.

set(STACKWISE_BUILD_CUDA "$ENV{STACKWISE_BUILD_CUDA}" CACHE STRING "auto, 0 or 1")
if(STACKWISE_BUILD_CUDA STREQUAL "")
  set(STACKWISE_BUILD_CUDA auto CACHE STRING "auto, 0 or 1" FORCE)
endif()
string(TOLOWER "${STACKWISE_BUILD_CUDA}" _sw_gate)
if(_sw_gate STREQUAL "on" OR _sw_gate STREQUAL "true" OR _sw_gate STREQUAL "yes")
  set(_sw_gate 1)
elseif(_sw_gate STREQUAL "off" OR _sw_gate STREQUAL "false" OR _sw_gate STREQUAL "no")
  set(_sw_gate 0)
endif()
if(NOT _sw_gate MATCHES "^(auto|0|1)$")
  message(FATAL_ERROR "stackwise: STACKWISE_BUILD_CUDA must be auto, 0 or 1, got '${STACKWISE_BUILD_CUDA}'")
endif()

set(STACKWISE_WITH_CUDA OFF)
set(STACKWISE_CUDA_OFF_REASON "")
set(STACKWISE_CUDA_ARCHS "")
set(STACKWISE_NVCC_VERSION "")
set(STACKWISE_CUDA_ROOT "")

function(_sw_find_cuda_root out)
  set(_cands "")
  foreach(_v CUDAToolkit_ROOT CUDA_TOOLKIT_ROOT_DIR)
    if(${_v})
      list(APPEND _cands "${${_v}}")
    endif()
  endforeach()
  foreach(_e CUDAToolkit_ROOT CUDA_HOME CUDA_PATH)
    if(DEFINED ENV{${_e}})
      list(APPEND _cands "$ENV{${_e}}")
    endif()
  endforeach()
  list(APPEND _cands /usr/local/cuda)
  find_program(_sw_nvcc_on_path nvcc)
  if(_sw_nvcc_on_path)
    get_filename_component(_real "${_sw_nvcc_on_path}" REALPATH)
    get_filename_component(_bin "${_real}" DIRECTORY)
    get_filename_component(_root "${_bin}" DIRECTORY)
    list(APPEND _cands "${_root}")
  endif()
  foreach(_c IN LISTS _cands)
    if(EXISTS "${_c}/bin/nvcc" AND EXISTS "${_c}/include/cuda_runtime.h")
      set(${out} "${_c}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out} "" PARENT_SCOPE)
endfunction()

# Converts TORCH_CUDA_ARCH_LIST syntax to CMAKE_CUDA_ARCHITECTURES syntax:
# "9.0a" -> "90a-real", "9.0+PTX" -> "90" (SASS and PTX).
function(_sw_arch_list out)
  set(_list "$ENV{TORCH_CUDA_ARCH_LIST}")
  if(_list STREQUAL "")
    set(_list "9.0a")
  endif()
  string(REPLACE " " ";" _list "${_list}")
  set(_result "")
  foreach(_a IN LISTS _list)
    if(_a STREQUAL "")
      continue()
    endif()
    if(NOT _a MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
      message(FATAL_ERROR "stackwise: TORCH_CUDA_ARCH_LIST entry '${_a}' is not like 9.0, 9.0a or 9.0+PTX")
    endif()
    set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(CMAKE_MATCH_4)
      list(APPEND _result "${_num}")
    else()
      list(APPEND _result "${_num}-real")
    endif()
  endforeach()
  set(${out} "${_result}" PARENT_SCOPE)
endfunction()

if(_sw_gate STREQUAL "0")
  set(STACKWISE_CUDA_OFF_REASON "STACKWISE_BUILD_CUDA=0")
elseif(NOT STACKWISE_TORCH_CUDA_VERSION)
  set(STACKWISE_CUDA_OFF_REASON "torch ${STACKWISE_TORCH_VERSION} is not a CUDA build")
else()
  _sw_find_cuda_root(STACKWISE_CUDA_ROOT)
  if(NOT STACKWISE_CUDA_ROOT)
    set(STACKWISE_CUDA_OFF_REASON "no CUDA toolkit found (set CUDA_HOME to a folder holding bin/nvcc)")
  else()
    execute_process(COMMAND "${STACKWISE_CUDA_ROOT}/bin/nvcc" --version
      OUTPUT_VARIABLE _nvcc_out RESULT_VARIABLE _nvcc_rc)
    string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_nvcc_out}")
    if(NOT _nvcc_rc EQUAL 0 OR NOT _m)
      set(STACKWISE_CUDA_OFF_REASON "${STACKWISE_CUDA_ROOT}/bin/nvcc --version did not run")
    else()
      set(STACKWISE_NVCC_VERSION "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
      set(_nvcc_major "${CMAKE_MATCH_1}")
      string(REGEX MATCH "^[0-9]+" _torch_major "${STACKWISE_TORCH_CUDA_VERSION}")
      if(NOT _nvcc_major STREQUAL _torch_major)
        set(STACKWISE_CUDA_OFF_REASON
          "nvcc ${STACKWISE_NVCC_VERSION} at ${STACKWISE_CUDA_ROOT} does not match torch's CUDA ${STACKWISE_TORCH_CUDA_VERSION}")
      elseif(NOT STACKWISE_NVIDIA_WHEEL_ROOT AND NOT EXISTS "${STACKWISE_CUDA_ROOT}/include/cublas_v2.h")
        set(STACKWISE_CUDA_OFF_REASON
          "cublas_v2.h is neither in ${STACKWISE_CUDA_ROOT}/include nor in the nvidia pip wheels")
      else()
        set(STACKWISE_WITH_CUDA ON)
      endif()
    endif()
  endif()
endif()

if(NOT STACKWISE_WITH_CUDA)
  if(_sw_gate STREQUAL "1")
    message(FATAL_ERROR "stackwise: STACKWISE_BUILD_CUDA=1 but ${STACKWISE_CUDA_OFF_REASON}")
  endif()
  message(STATUS "stackwise: CUDA kernels off: ${STACKWISE_CUDA_OFF_REASON}")
  return()
endif()

_sw_arch_list(STACKWISE_CUDA_ARCHS)
set(CMAKE_CUDA_COMPILER "${STACKWISE_CUDA_ROOT}/bin/nvcc")
set(CUDAToolkit_ROOT "${STACKWISE_CUDA_ROOT}")
set(CMAKE_CUDA_ARCHITECTURES "${STACKWISE_CUDA_ARCHS}")
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
message(STATUS "stackwise: CUDA kernels on: nvcc ${STACKWISE_NVCC_VERSION} at ${STACKWISE_CUDA_ROOT}, architectures ${STACKWISE_CUDA_ARCHS}")

# libtorch_cuda / libc10_cuda and the headers ATen's CUDA side includes.
find_library(_sw_torch_cuda_lib torch_cuda PATHS "${STACKWISE_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(_sw_c10_cuda_lib c10_cuda PATHS "${STACKWISE_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
add_library(stackwise::torch_cuda INTERFACE IMPORTED GLOBAL)
target_link_libraries(stackwise::torch_cuda INTERFACE
  stackwise::torch "${_sw_c10_cuda_lib}" "${_sw_torch_cuda_lib}" CUDA::cudart)
target_compile_definitions(stackwise::torch_cuda INTERFACE STACKWISE_WITH_CUDA=1)
if(STACKWISE_NVIDIA_WHEEL_ROOT)
  # After the toolkit's own include folder, so its cuda_runtime.h wins where both have one.
  target_include_directories(stackwise::torch_cuda SYSTEM INTERFACE
    "${STACKWISE_CUDA_ROOT}/include" "${STACKWISE_NVIDIA_WHEEL_ROOT}/include")
endif()

# Flags torch's own extension builder uses: the half/bfloat16 operator macros keep CUDA's
# implicit conversions from clashing with c10::Half / c10::BFloat16.
set(STACKWISE_CUDA_FLAGS
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr --expt-extended-lambda -lineinfo
  # 20012/20014 ("__host__ annotation ignored on defaulted function"): noise from c10 headers.
  -diag-suppress=20012,20014)
