// Fused masked SGD on CPU: one pass over memory per tensor (read p, g, b and the mask
// words; write p, b), torch.optim.SGD's arithmetic in float (double for fp64), pruned
// entries written as exactly 0. Work is split into 32-element mask words, in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dsd_kernels_cpu {
namespace {

struct Hyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

template <typename scalar_t, typename acc_t>
void step_tensor(at::Tensor& param, const at::Tensor& grad, at::Tensor* buf, const int32_t* words,
                 bool first, const Hyper& h) {
  const MaskLayout lay(param);
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* b = buf ? buf->data_ptr<scalar_t>() : nullptr;
  const acc_t lr = h.lr, mom = h.momentum, damp = 1 - h.dampening, wd = h.weight_decay;
  const bool use_momentum = buf != nullptr;
  parallel_for_words(lay, 2048, [&](int64_t w, int64_t base, int64_t len) {
    const uint32_t bits = words ? static_cast<uint32_t>(words[w]) : 0xFFFFFFFFu;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t e = base + j;
      const bool keep = (bits >> j) & 1u;
      acc_t d = static_cast<acc_t>(g[e]);
      acc_t x = static_cast<acc_t>(p[e]);
      if (h.maximize) d = -d;
      if (wd != 0) d += wd * x;
      if (use_momentum) {
        acc_t v = first ? d : static_cast<acc_t>(b[e]) * mom + damp * d;
        d = h.nesterov ? d + mom * v : v;
        b[e] = keep ? static_cast<scalar_t>(v) : static_cast<scalar_t>(0);
      }
      p[e] = keep ? static_cast<scalar_t>(x - lr * d) : static_cast<scalar_t>(0);
    }
  });
}

void masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                 const c10::List<std::optional<at::Tensor>>& mask_words,
                 const c10::List<bool>& first_step, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize) {
  const Hyper h{lr, momentum, dampening, weight_decay, nesterov, maximize};
  const bool use_momentum = momentum != 0;
  TORCH_CHECK(grads.size() == params.size() && mask_words.size() == params.size(),
              "masked_sgd_: params, grads and mask_words must have equal lengths");
  TORCH_CHECK(!use_momentum || (bufs.size() == params.size() && first_step.size() == params.size()),
              "masked_sgd_: momentum needs one buffer and one first_step flag per param");
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    TORCH_CHECK(p.is_contiguous() && grads[i].is_contiguous(), "masked_sgd_: params[", i,
                "] and grads[", i, "] must be contiguous");
    TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].scalar_type() == p.scalar_type(),
                "masked_sgd_: grads[", i, "] does not match params[", i, "]");
    at::Tensor b = use_momentum ? bufs[i] : at::Tensor();
    const std::optional<at::Tensor> mw = mask_words.get(i);
    const int32_t* words = nullptr;
    if (mw.has_value()) {
      TORCH_CHECK(mw->is_contiguous() && mw->scalar_type() == at::kInt &&
                      mw->numel() == MaskLayout(p).num_words(),
                  "masked_sgd_: mask_words[", i, "] does not fit params[", i, "]");
      words = mw->data_ptr<int32_t>();
    }
    const bool first = use_momentum && first_step.get(i);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      step_tensor<scalar_t, acc_t>(p, grads[i], use_momentum ? &b : nullptr, words, first, h);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) { m.impl("masked_sgd_", &masked_sgd_); }

}  // namespace dsd_kernels_cpu
