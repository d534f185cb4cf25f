// Schemas of the C++ backend ops (namespace dsd_kernels_cpp) and the Python module stub.
// Kernels: csrc/cpu (CPU dispatch key) and, in a CUDA build, csrc/cuda (CUDA dispatch key).
//
// The public ops are the Python custom ops `dsd_kernels::*`; they choose a backend in
// dsd_kernels/ops/ and call these when the C++ backend is selected. Keeping the C++
// kernels under their own namespace lets every backend stay selectable at run time
// (DSD_KERNELS_BACKEND) and tested against the same reference.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

extern "C" {
// `import dsd_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dsd_kernels_cpp, m) {
  using namespace dsd_kernels_schemas;
  m.def(kMagnitudeSelect);
  m.def(kRadixHistogram);
  m.def(kThresholdMasks);
  m.def(kBracketPass);
  m.def(kBucketSplit);
  m.def(kResolveMasks);
  m.def(kNmMasks);
  m.def(kApplyMasks);
  m.def(kMaskSubsets);
  m.def(kMaskUpdate);
  m.def(kMaskedSgd);
  m.def(kMaskedAdamw);
  m.def(kMaskedAdamwFused);
  m.def(kAdvanceAdamwSteps);
  m.def(kMaskedLinearForward);
  m.def(kMaskedLinearBackward);
}
