// Exact magnitude selection on CPU (dsd_kernels_cpp::magnitude_select): per tensor, the k-th
// smallest magnitude (local_select.h) and the packed keep-words (selection.h write_mask); a list's
// tensors spread over the threads as common.h's for_each_tensor does.
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "local_select.h"

namespace dsd_kernels_cpu {
namespace {

using namespace selection;

template <typename scalar_t>
void select_one(const at::Tensor& t, double sparsity, bool want_masks, double* threshold, at::Tensor* mask) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  const int64_t k = static_cast<int64_t>(std::nearbyint(sparsity * static_cast<double>(n)));
  const scalar_t* data = c.data_ptr<scalar_t>();
  Selection sel;
  if (k > 0) {
    sel = radix_select<scalar_t>(data, n, k);
    *threshold = key_value<scalar_t>(static_cast<typename KeyTraits<scalar_t>::bits_t>(sel.key));
  } else {
    *threshold = -std::numeric_limits<double>::infinity();
  }
  if (want_masks) {
    MaskLayout lay(c);
    *mask = at::empty({lay.rows, lay.words_per_row}, c.options().dtype(at::kInt));
    if (lay.num_words() > 0) write_mask<scalar_t>(data, lay, sel, k > 0, mask->data_ptr<int32_t>());
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> magnitude_select(
    at::TensorList tensors, at::ArrayRef<double> sparsities, bool want_masks) {
  TORCH_CHECK(tensors.size() == sparsities.size(), "magnitude_select: ", tensors.size(),
              " tensors but ", sparsities.size(), " sparsities");
  at::Tensor thresholds = at::empty({static_cast<int64_t>(tensors.size())}, at::kDouble);
  double* th = thresholds.data_ptr<double>();
  std::vector<at::Tensor> masks(want_masks ? tensors.size() : 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "magnitude_select: tensors[", i, "] is not a CPU tensor");
    TORCH_CHECK(sparsities[i] >= 0.0 && sparsities[i] <= 1.0, "magnitude_select: sparsities[", i,
                "] must be in [0, 1], got ", sparsities[i]);
  }
  const auto select = [&](size_t i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[i].scalar_type(), "magnitude_select", [&] {
      select_one<scalar_t>(tensors[i], sparsities[i], want_masks, th + i, want_masks ? &masks[i] : nullptr);
    });
  };
  std::vector<int64_t> numels;
  for (const auto& t : tensors) numels.push_back(t.numel());
  for_each_tensor(numels, select);
  return {thresholds, masks};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("magnitude_select", &magnitude_select);
}

}  // namespace dsd_kernels_cpu
