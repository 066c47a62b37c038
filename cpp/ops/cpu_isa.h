// Run-time choice between the per-ISA builds of a CPU kernel (see cmake/StackwiseCpuKernels.cmake).
//
// A kernel file `<family>_cpu_kernel.cpp` defines its functions in
// `namespace stackwise::cpu::CPU_CAPABILITY`, so it is compiled once per ISA into the namespaces
// DEFAULT, AVX2 and AVX512. STACKWISE_DECLARE_CPU_KERNEL declares a function in all of them and
// STACKWISE_CPU_DISPATCH calls the one torch's CPU capability selects (ATEN_CPU_CAPABILITY
// overrides it, as for torch's own kernels).
#pragma once

namespace stackwise::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The ISA torch runs its own kernels with, capped by what this build compiled.
Isa current_isa();

// "DEFAULT", "AVX2" or "AVX512".
const char* isa_name(Isa isa);

}  // namespace stackwise::cpu

#if defined(STACKWISE_CPU_X86)
#define STACKWISE_DECLARE_CPU_KERNEL(ret, name, ...)      \
  namespace stackwise::cpu::DEFAULT { ret name(__VA_ARGS__); } \
  namespace stackwise::cpu::AVX2 { ret name(__VA_ARGS__); }    \
  namespace stackwise::cpu::AVX512 { ret name(__VA_ARGS__); }

#define STACKWISE_CPU_DISPATCH(name, ...)                           \
  [&] {                                                             \
    switch (::stackwise::cpu::current_isa()) {                      \
      case ::stackwise::cpu::Isa::AVX512:                           \
        return ::stackwise::cpu::AVX512::name(__VA_ARGS__);         \
      case ::stackwise::cpu::Isa::AVX2:                             \
        return ::stackwise::cpu::AVX2::name(__VA_ARGS__);           \
      default:                                                      \
        return ::stackwise::cpu::DEFAULT::name(__VA_ARGS__);        \
    }                                                               \
  }()
#else
#define STACKWISE_DECLARE_CPU_KERNEL(ret, name, ...) \
  namespace stackwise::cpu::DEFAULT { ret name(__VA_ARGS__); }
#define STACKWISE_CPU_DISPATCH(name, ...) ::stackwise::cpu::DEFAULT::name(__VA_ARGS__)
#endif
