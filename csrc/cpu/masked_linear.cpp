// masked_linear on CPU: the matmuls are ATen's (MKL/oneDNN); the mask is applied straight
// from the packed words (no unpacked copy of the mask is kept), in parallel, to W before
// the forward and dX matmuls and to dW after its matmul.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace dsd_kernels_cpu {
namespace {

// dst = src where kept, exactly +0 where pruned (dst may alias src): an AND of the float bits
// with 0 or all-ones, branch-free (an unstructured mask would mispredict every other branch)
template <typename scalar_t>
void apply_mask(const scalar_t* src, scalar_t* dst, const int32_t* words, const MaskLayout& lay) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  parallel_for_words(lay, 2048, [&](int64_t w, int64_t base, int64_t len) {
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    for (int64_t j = 0; j < len; ++j) {
      bits_t v;
      std::memcpy(&v, src + base + j, sizeof(v));
      v &= static_cast<bits_t>(0) - static_cast<bits_t>((bits >> j) & 1u);
      std::memcpy(dst + base + j, &v, sizeof(v));
    }
  });
}

at::Tensor masked(const at::Tensor& t, const at::Tensor& words, bool in_place) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "masked_linear: weights must be contiguous 2-D");
  const MaskLayout lay(t);
  TORCH_CHECK(words.scalar_type() == at::kInt && words.is_contiguous() &&
                  words.numel() == lay.num_words(),
              "masked_linear: mask_words do not fit a weight of shape ", t.sizes());
  at::Tensor out = in_place ? t : at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "masked_linear", [&] {
    apply_mask<scalar_t>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         words.data_ptr<int32_t>(), lay);
  });
  return out;
}

at::Tensor masked_linear_forward(const at::Tensor& x2d, const at::Tensor& weight,
                                 const at::Tensor& words, const std::optional<at::Tensor>& bias) {
  const at::Tensor w = masked(weight.contiguous(), words, /*in_place=*/false);
  return bias.has_value() ? at::addmm(*bias, x2d, w.t()) : at::mm(x2d, w.t());
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& grad2d,
                                                          const at::Tensor& x2d,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& words,
                                                          bool needs_input, bool needs_weight) {
  at::Tensor dx, dw;
  if (needs_input) dx = at::mm(grad2d, masked(weight.contiguous(), words, false));
  if (needs_weight) dw = masked(at::mm(grad2d.t(), x2d).contiguous(), words, /*in_place=*/true);
  if (!dx.defined()) dx = at::empty({0}, x2d.options());
  if (!dw.defined()) dw = at::empty({0}, weight.options());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("masked_linear_forward", &masked_linear_forward);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

}  // namespace dsd_kernels_cpu
