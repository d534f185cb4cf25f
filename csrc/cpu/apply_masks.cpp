// Zero the pruned entries of many tensors in place, from their packed masks: the re-masking pass
// that keeps pruned weights (and gradients) exactly 0 under any optimizer (dsd_kernels/optim/
// masking.py). One read and one write of every masked tensor, in parallel over 32-element mask
// words; a pruned entry becomes exactly +0 whatever it held (NaN included). fp32 on AVX-512:
// masked stores of +0 into the pruned lanes only (common.h); on AVX2 the portable pass of
// csrc/cpu/isa (words that keep everything skipped, words that keep nothing stored as +0 unread);
// elsewhere a scalar word loop (x86-64's generic vectors ran the portable pass far slower; NEON's
// has not been timed on an ARM CPU).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../op_args.h"
#include "common.h"
#include "isa/isa_kernels.h"

namespace dsd_kernels_cpu {
namespace {

void apply_masks_(at::TensorList tensors, at::TensorList mask_words) {
  TORCH_CHECK(tensors.size() == mask_words.size(), "apply_masks_: ", tensors.size(), " tensors but ",
              mask_words.size(), " masks");
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    const at::Tensor& words = mask_words[i];
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), "apply_masks_: tensors[", i,
                "] must be a contiguous CPU tensor");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "apply_masks_: tensors[", i, "] is ", t.scalar_type(),
                "; masks apply to floating tensors");
    dsd_kernels_args::check_words("apply_masks_", i, words, t, "tensors");
    const MaskLayout lay(t);
    const int32_t* w = words.data_ptr<int32_t>();
#ifdef DSD_HAVE_AVX512_KERNELS
    if (t.scalar_type() == at::kFloat && cpu_has_avx512f()) {
      float* data = t.data_ptr<float>();
      if (lay.cols % 32 == 0) {  // rows of whole words: one row of all the words
        at::parallel_for(0, lay.num_words(), 2048, [&](int64_t begin, int64_t end) {
          zero_pruned_row_avx512(data + begin * 32, w + begin, (end - begin) * 32);
        });
      } else {
        at::parallel_for(0, lay.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(lay.cols, 1)),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t r = begin; r < end; ++r) {
                             zero_pruned_row_avx512(data + r * lay.cols, w + r * lay.words_per_row, lay.cols);
                           }
                         });
      }
      continue;
    }
#endif
    if (t.scalar_type() == at::kFloat && cpu_capability() == CpuCapability::kAvx2) {
      float* data = t.data_ptr<float>();
      if (lay.cols % 32 == 0) {
        at::parallel_for(0, lay.num_words(), 2048, [&](int64_t begin, int64_t end) {
          isa::AVX2::zero_pruned_fp32(data + begin * 32, w + begin, (end - begin) * 32);
        });
      } else {
        at::parallel_for(0, lay.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(lay.cols, 1)),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t r = begin; r < end; ++r) {
                             isa::AVX2::zero_pruned_fp32(data + r * lay.cols, w + r * lay.words_per_row, lay.cols);
                           }
                         });
      }
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "apply_masks_", [&] {
      scalar_t* data = t.data_ptr<scalar_t>();
      parallel_for_words(lay, 2048, [&](int64_t word, int64_t base, int64_t len) {
        const auto bits = static_cast<uint32_t>(w[word]);
        if (bits != 0xFFFFFFFFu) mask_word(data + base, data + base, bits, len);  // all kept: as is
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) { m.impl("apply_masks_", &apply_masks_); }

}  // namespace dsd_kernels_cpu
