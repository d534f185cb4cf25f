// Which vector ISA the CPU kernels run: the best this CPU has and this build compiled, or a lower
// one asked for with DSD_KERNELS_CPU_CAPABILITY=default|avx2|avx512 (as ATEN_CPU_CAPABILITY
// works for torch), so that a machine with AVX-512 can test and time the AVX2 and portable paths.
// Read once per process. Plain C++: the per-ISA sources (csrc/cpu/isa) include it too.
#pragma once

namespace dsd_kernels_cpu {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The capability the kernels run (the switch applied); a switch naming no capability, or one this
// CPU or build lacks, raises an error naming DSD_KERNELS_CPU_CAPABILITY at every call.
CpuCapability cpu_capability();

// The best capability this CPU offers and this build compiled kernels for (the switch ignored).
CpuCapability best_cpu_capability();

// "default", "avx2", "avx512"
const char* capability_name(CpuCapability cap);

}  // namespace dsd_kernels_cpu
