// The portable kernels (isa_kernels.h) for the baseline ISA: at::vec's generic vectors on x86-64
// (what the compiler makes of them with SSE2), NEON on aarch64. setup.py compiles it with
// CPU_CAPABILITY=DEFAULT, as avx2.cpp and avx512.cpp with theirs.
#ifndef CPU_CAPABILITY_DEFAULT
#error "compile with -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT (setup.py ISA_SOURCES)"
#endif
#include "kernels.h"
