// Maps torch's CPU capability string to the ISA builds of our kernels.
#include "cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace stackwise::cpu {

Isa current_isa() {
#if defined(STACKWISE_CPU_X86)
  // at::get_cpu_capability() already combines CPU detection with ATEN_CPU_CAPABILITY; it is
  // read once, as torch reads it once.
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::AVX512;
    if (cap == "AVX2") return Isa::AVX2;
    return Isa::DEFAULT;
  }();
  return isa;
#else
  return Isa::DEFAULT;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      return "AVX512";
    case Isa::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

}  // namespace stackwise::cpu
