// The argument check of the masked_adamw_ op's compiled kernels (csrc/cpu and csrc/cuda): the
// Python op checks first; this guards direct calls of torch.ops.dsd_kernels_cpp.masked_adamw_.
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "op_args.h"

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
  constexpr const char* op = "masked_adamw_";
  using namespace dsd_kernels_args;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                "masked_adamw_: params[", i, "] is ", p.scalar_type(),
                "; the compiled kernels take float32 and float64");
    TORCH_CHECK(p.device() == params[0].device(), "masked_adamw_: params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device());
    check_like(op, "params", i, p, p);
    check_like(op, "grads", i, grads[i], p);
    std::vector<std::pair<const char*, const at::Tensor*>> mutated{{"exp_avgs", &exp_avgs[i]},
                                                                  {"exp_avg_sqs", &exp_avg_sqs[i]}};
    if (amsgrad) mutated.emplace_back("max_exp_avg_sqs", &max_exp_avg_sqs[i]);
    for (const auto& [name, t] : mutated) check_like(op, name, i, *t, p);
    mutated.emplace_back("params", &p);
    // every mutated tensor apart from every other argument of the parameter
    for (size_t a = 0; a < mutated.size(); ++a) {
      check_apart(op, mutated[a].first, i, *mutated[a].second, "grads", grads[i]);
      for (size_t b = a + 1; b < mutated.size(); ++b) {
        check_apart(op, mutated[a].first, i, *mutated[a].second, mutated[b].first, *mutated[b].second);
      }
    }
    const std::optional<at::Tensor> mw = mask_words.get(i);
    if (mw.has_value()) check_words(op, i, *mw, p);
  }
}

}  // namespace dsd_kernels_adamw
