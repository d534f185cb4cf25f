// The argument check of the masked_sgd_ op's compiled kernels (csrc/cpu and csrc/cuda): the
// Python op checks first; this guards direct calls of torch.ops.dsd_kernels_cpp.masked_sgd_.
#pragma once
#include <ATen/core/Tensor.h>

#include "op_args.h"

namespace dsd_kernels_sgd {

// Lists of one entry per param; params floating, contiguous, on params[0]'s device, with a gradient
// (and with momentum a buffer) of their shape, dtype and device, the buffer sharing no memory with
// the param or gradient; mask words int32 that fit them, or none.
inline void check_masked_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  const c10::List<std::optional<at::Tensor>>& mask_words,
                                  const c10::List<bool>& first_step, bool use_momentum) {
  using namespace dsd_kernels_args;
  constexpr const char* op = "masked_sgd_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && mask_words.size() == n,
              "masked_sgd_: params, grads and mask_words must have equal lengths");
  TORCH_CHECK(!use_momentum || (bufs.size() == n && first_step.size() == n),
              "masked_sgd_: momentum needs one buffer and one first_step flag per param");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "masked_sgd_: params[", i, "] is ", p.scalar_type(),
                "; SGD needs floating parameters");
    TORCH_CHECK(p.device() == params[0].device(), "masked_sgd_: params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device());
    check_like(op, "params", i, p, p);
    check_like(op, "grads", i, grads[i], p);
    check_apart(op, "params", i, p, "grads", grads[i]);
    if (use_momentum) {
      check_like(op, "momentum_buffers", i, bufs[i], p);
      check_apart(op, "momentum_buffers", i, bufs[i], "params", p);
      check_apart(op, "momentum_buffers", i, bufs[i], "grads", grads[i]);
    }
    const std::optional<at::Tensor> mw = mask_words.get(i);
    if (mw.has_value()) check_words(op, i, *mw, p);
  }
}

}  // namespace dsd_kernels_sgd
