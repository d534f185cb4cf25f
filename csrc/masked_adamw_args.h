// The argument check of the masked_adamw_ op's compiled kernels (csrc/cpu and csrc/cuda): the
// Python op checks first; this guards direct calls of torch.ops.dsd_kernels_cpp.masked_adamw_.
#pragma once
#include <ATen/ATen.h>

#include "mask_layout.h"

namespace dsd_kernels_adamw {

// Lists of one entry per param; params float32/float64, contiguous, on params[0]'s device, with
// gradient and moments (and max_exp_avg_sq with amsgrad) of their shape, dtype and device;
// mask words int32 that fit them, or none.
inline void check_masked_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                    const c10::List<std::optional<at::Tensor>>& mask_words,
                                    at::ArrayRef<double> step_sizes, at::ArrayRef<double> bias_correction2_sqrts,
                                    bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  mask_words.size() == n && step_sizes.size() == n && bias_correction2_sqrts.size() == n,
              "masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, mask_words, step_sizes and "
              "bias_correction2_sqrts must have equal lengths");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
              "masked_adamw_: amsgrad needs one max_exp_avg_sq per param");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                "masked_adamw_: params[", i, "] is ", p.scalar_type(),
                "; the compiled kernels take float32 and float64");
    TORCH_CHECK(p.device() == params[0].device() && p.is_contiguous(), "masked_adamw_: params[", i,
                "] must be contiguous on ", params[0].device());
    for (const at::Tensor* other : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(other->device() == p.device() && other->is_contiguous() && other->sizes() == p.sizes() &&
                      other->scalar_type() == p.scalar_type(),
                  "masked_adamw_: the gradient and moments of params[", i,
                  "] must be contiguous tensors of its shape, dtype and device");
    }
    TORCH_CHECK(!amsgrad || (max_exp_avg_sqs[i].device() == p.device() && max_exp_avg_sqs[i].is_contiguous() &&
                             max_exp_avg_sqs[i].sizes() == p.sizes() &&
                             max_exp_avg_sqs[i].scalar_type() == p.scalar_type()),
                "masked_adamw_: max_exp_avg_sqs[", i, "] does not match params[", i, "]");
    const std::optional<at::Tensor> mw = mask_words.get(i);
    TORCH_CHECK(!mw.has_value() || (mw->device() == p.device() && mw->is_contiguous() &&
                                    mw->scalar_type() == at::kInt &&
                                    mw->numel() == dsd_kernels_layout::MaskLayout(p).num_words()),
                "masked_adamw_: mask_words[", i, "] does not fit params[", i, "]");
  }
}

}  // namespace dsd_kernels_adamw
