// csrc/cuda/masked_adamw.cu, compiled for the CPU emulation (see emulation.h).
#include "emulation.h"
#include "../../../csrc/cuda/masked_adamw.cu"
