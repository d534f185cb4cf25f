// Every kernel of isa_kernels.h for the ISA the including source set (CPU_CAPABILITY): what
// default.cpp, avx2.cpp and avx512.cpp compile.
#pragma once
#include "apply_masks_kernel.h"
#include "compress_kernel.h"
#include "few_rows_kernel.h"
#include "masked_adamw_kernel.h"
#include "masked_sgd_kernel.h"
#include "nm_kernel.h"
#include "tile_gemm_kernel.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {

bool built() { return true; }

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
