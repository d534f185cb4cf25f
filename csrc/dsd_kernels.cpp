// Schemas of the C++ backend ops (namespace dsd_kernels_cpp) and the Python module stub.
//
// The public ops are the Python custom ops `dsd_kernels::*`; they choose a backend in
// dsd_kernels/ops.py and call these when the C++ backend is selected. Keeping the C++
// kernels under their own namespace lets every backend stay selectable at run time
// (DSD_KERNELS_BACKEND) and tested against the same reference.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dsd_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dsd_kernels_cpp, m) {
  // thresholds as float64 (exact for every float dtype), packed keep-masks when want_masks
  m.def("magnitude_select(Tensor[] tensors, float[] sparsities, bool want_masks) -> (Tensor, Tensor[])");
  m.def(
      "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor?[] mask_words, bool[] first_step, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize) -> ()");
  m.def("masked_linear_forward(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias) -> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor mask_words, "
      "bool needs_input, bool needs_weight) -> (Tensor, Tensor)");
}
