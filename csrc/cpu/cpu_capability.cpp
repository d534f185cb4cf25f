// DSD_KERNELS_CPU_CAPABILITY and the detection behind it (cpu_capability.h).
#include "cpu_capability.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "../op_schemas.h"
#include "isa/isa_kernels.h"

namespace dsd_kernels_cpu {
namespace {

bool cpu_offers(CpuCapability cap) {
  switch (cap) {
    case CpuCapability::kDefault:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // what ATen's AVX2 and AVX512 builds ask of a CPU (torch/csrc's cpuinfo checks), and POPCNT
    // (which every CPU with AVX2 has; the per-ISA files are compiled with -mpopcnt)
    case CpuCapability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    case CpuCapability::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
#endif
    default:
      return false;
  }
}

bool compiled(CpuCapability cap) {
  switch (cap) {
    case CpuCapability::kDefault: return isa::DEFAULT::built();
    case CpuCapability::kAvx2: return isa::AVX2::built();
    case CpuCapability::kAvx512: return isa::AVX512::built();
  }
  return false;
}

CpuCapability from_switch(const std::string& raw, CpuCapability best) {
  std::string name;
  for (char c : raw) name += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  CpuCapability asked;
  if (name == "default") {
    asked = CpuCapability::kDefault;
  } else if (name == "avx2") {
    asked = CpuCapability::kAvx2;
  } else if (name == "avx512") {
    asked = CpuCapability::kAvx512;
  } else {
    TORCH_CHECK(false, "DSD_KERNELS_CPU_CAPABILITY='", raw, "' is not one of default, avx2, avx512");
  }
  TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), "DSD_KERNELS_CPU_CAPABILITY=", name,
              ": this CPU and build offer at most ", capability_name(best));
  return asked;
}

}  // namespace

CpuCapability best_cpu_capability() {
  static const CpuCapability best = [] {
    for (CpuCapability cap : {CpuCapability::kAvx512, CpuCapability::kAvx2}) {
      if (cpu_offers(cap) && compiled(cap)) return cap;
    }
    return CpuCapability::kDefault;
  }();
  return best;
}

CpuCapability cpu_capability() {
  // a bad switch throws here, so the static is left unset and every call reports it again
  static const CpuCapability cap = [] {
    const char* env = std::getenv("DSD_KERNELS_CPU_CAPABILITY");
    if (env == nullptr || *env == '\0') return best_cpu_capability();
    return from_switch(env, best_cpu_capability());
  }();
  return cap;
}

const char* capability_name(CpuCapability cap) {
  switch (cap) {
    case CpuCapability::kDefault: return "default";
    case CpuCapability::kAvx2: return "avx2";
    case CpuCapability::kAvx512: return "avx512";
  }
  return "?";
}

namespace {
std::string cpu_capability_op() { return capability_name(cpu_capability()); }
std::string best_cpu_capability_op() { return capability_name(best_cpu_capability()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(dsd_kernels_cpp, m) {
  m.def(dsd_kernels_schemas::kCpuCapability, &cpu_capability_op);
  m.def(dsd_kernels_schemas::kBestCpuCapability, &best_cpu_capability_op);
}

}  // namespace dsd_kernels_cpu
