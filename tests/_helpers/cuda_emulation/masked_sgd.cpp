// csrc/cuda/masked_sgd.cu, compiled for the CPU emulation (see emulation.h).
#include "emulation.h"
#include "../../../csrc/cuda/masked_sgd.cu"
