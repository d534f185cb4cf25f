// The emulated CUDA kernels' ops, registered for CPU tensors under their own namespace.
#include "emulation.h"
#include "../../../csrc/op_schemas.h"

TORCH_LIBRARY(dsd_kernels_cuda_emu, m) {
  m.def(dsd_kernels_schemas::kMagnitudeSelect);
  m.def(dsd_kernels_schemas::kMaskedSgd);
  m.def(dsd_kernels_schemas::kMaskedAdamw);
}
