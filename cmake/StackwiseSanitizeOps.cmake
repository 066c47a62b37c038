# STACKWISE_SANITIZE=ops: the op kernels that have C++ tests (SwiGLU, RMSNorm, RoPE, linear
# attention), the registrations and the torch-free core, with test_ops and test_core, all
# compiled with
# -fsanitize=address,undefined (UBSan aborts on its first finding). Only the DEFAULT ISA is built
# (one object per kernel instead of three, which keeps the build short) and libtorch is used as
# installed, uninstrumented. Included from CMakeLists.txt after stackwise_core is defined.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
include(cmake/StackwiseTorch.cmake)
find_package(GTest REQUIRED)
enable_testing()
include(GoogleTest)

set(_sw_san -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
            -g -O1)
target_compile_options(stackwise_core PUBLIC ${_sw_san})
target_link_options(stackwise_core PUBLIC ${_sw_san})

set(_sw_kernels swiglu_cpu_kernel rms_norm_cpu_kernel rope_cpu_kernel linear_attention_cpu_kernel)
add_library(stackwise_ops_sanitized OBJECT
  cpp/ops/registration.cpp cpp/ops/cpu_isa.cpp cpp/ops/cpu_alloc.cpp cpp/ops/cpu_gemm.cpp
  cpp/ops/swiglu_cpu.cpp cpp/ops/rms_norm_cpu.cpp cpp/ops/rope_cpu.cpp
  cpp/ops/linear_attention_cpu.cpp cpp/ops/linear_attention_chunked.cpp)
foreach(_k IN LISTS _sw_kernels)
  target_sources(stackwise_ops_sanitized PRIVATE cpp/ops/${_k}.cpp)
  set_source_files_properties(cpp/ops/${_k}.cpp PROPERTIES
    COMPILE_DEFINITIONS "CPU_CAPABILITY=DEFAULT;CPU_CAPABILITY_DEFAULT")
endforeach()
target_include_directories(stackwise_ops_sanitized PUBLIC cpp/include cpp/ops)
target_link_libraries(stackwise_ops_sanitized PUBLIC stackwise::torch stackwise_core)
target_compile_options(stackwise_ops_sanitized PRIVATE ${STACKWISE_WARNINGS})

# libtorch's process-lifetime allocations are not leaks of ours: leak checking is off in the
# test binary itself, so test discovery (which runs it at build time) sees the same setting.
file(WRITE "${CMAKE_BINARY_DIR}/asan_options.cpp"
  "extern \"C\" const char* __asan_default_options() { return \"detect_leaks=0\"; }\n")
add_executable(test_ops tests/cpp/test_swiglu_dispatch.cpp tests/cpp/test_norm_rope_dispatch.cpp
  tests/cpp/test_linear_attention_dispatch.cpp "${CMAKE_BINARY_DIR}/asan_options.cpp")
target_link_libraries(test_ops PRIVATE stackwise_ops_sanitized GTest::gtest GTest::gtest_main)
gtest_discover_tests(test_ops DISCOVERY_TIMEOUT 120)
# Every torch-free core test (the attention math the CPU kernels share among them).
stackwise_add_test_core()
message(STATUS "stackwise: sanitizer build (address, undefined) of the tested op kernels and the core")
