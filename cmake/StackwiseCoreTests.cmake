# test_core: the gtests of the torch-free core (checksums, spill format, the cache store; the
# attention and fused-loss math and the attention dispatch table the CPU and CUDA kernels share),
# defined once here and used by every build that runs them: the normal build
# (tests/cpp/CMakeLists.txt) and the sanitizer builds (STACKWISE_SANITIZE=address|thread|ops),
# so a test added to the list runs in all of them.
# The caller has found GTest and called enable_testing(); extra arguments are more sources for
# the binary.
set(STACKWISE_CORE_TEST_SOURCES
  test_crc32c.cpp
  test_attention_math.cpp
  test_attention_dispatch.cpp
  test_spill_format.cpp
  test_cache_store_core.cpp
  test_cache_store_safety.cpp
  test_linear_cross_entropy_math.cpp)

function(stackwise_add_test_core)
  include(GoogleTest)
  set(_sources "")
  foreach(_s IN LISTS STACKWISE_CORE_TEST_SOURCES)
    list(APPEND _sources "${PROJECT_SOURCE_DIR}/tests/cpp/${_s}")
  endforeach()
  add_executable(test_core ${_sources} ${ARGN})
  target_link_libraries(test_core PRIVATE stackwise_core GTest::gtest GTest::gtest_main)
  gtest_discover_tests(test_core DISCOVERY_TIMEOUT 60)
endfunction()
