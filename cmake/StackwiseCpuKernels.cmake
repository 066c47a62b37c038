# Per-ISA compilation of CPU kernels, the scheme ATen itself uses.
#
# at::vec::Vectorized<T> is only as wide as the flags the file is compiled with, and its headers
# put everything in `inline namespace CPU_CAPABILITY`. So each `<family>_cpu_kernel.cpp` is
# compiled once per capability with -DCPU_CAPABILITY=<name> and the matching -m flags; the
# dispatcher file (`<family>_cpu.cpp`) picks one at run time with at::get_cpu_capability(), which
# honours ATEN_CPU_CAPABILITY exactly as torch's own kernels do. An AVX-512 machine therefore runs
# 16-wide code, and the same build runs on a machine without AVX-512.

set(STACKWISE_CPU_CAPABILITIES DEFAULT)
set(_sw_flags_DEFAULT "")
set(_sw_flags_AVX2 -mavx2 -mfma -mf16c -mbmi -mbmi2)
set(_sw_flags_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mbmi -mbmi2)
set(STACKWISE_CPU_X86 OFF)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  list(APPEND STACKWISE_CPU_CAPABILITIES AVX2 AVX512)
  set(STACKWISE_CPU_X86 ON)
endif()

# stackwise_add_cpu_kernel(<target> <source>): adds one object per capability of <source> to the
# object library <target>.
function(stackwise_add_cpu_kernel target source)
  if(STACKWISE_CPU_X86)
    target_compile_definitions(${target} PRIVATE STACKWISE_CPU_X86=1)
  endif()
  get_filename_component(_name "${source}" NAME_WE)
  foreach(_cap IN LISTS STACKWISE_CPU_CAPABILITIES)
    set(_copy "${CMAKE_CURRENT_BINARY_DIR}/cpu_kernels/${_name}.${_cap}.cpp")
    # A one-line wrapper file per capability, so each object has its own flags.
    file(GENERATE OUTPUT "${_copy}" CONTENT "#include \"${CMAKE_CURRENT_SOURCE_DIR}/${source}\"\n")
    target_sources(${target} PRIVATE "${_copy}")
    set(_defs "CPU_CAPABILITY=${_cap}" "CPU_CAPABILITY_${_cap}")
    # gcc 12 flags its own AVX-512 intrinsics (inlined from ATen's vec headers) as
    # "may be used uninitialized"; the warning is about the headers, not our code.
    set_source_files_properties("${_copy}" PROPERTIES
      COMPILE_DEFINITIONS "${_defs}"
      COMPILE_OPTIONS "${_sw_flags_${_cap}};-Wno-maybe-uninitialized")
  endforeach()
endfunction()
