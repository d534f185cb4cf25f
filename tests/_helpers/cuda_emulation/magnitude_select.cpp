// csrc/cuda/magnitude_select.cu, compiled for the CPU emulation (see emulation.h).
#include "emulation.h"
#include "../../../csrc/cuda/magnitude_select.cu"
