// Shared helpers of the CPU kernels: parallel loops over packed-mask words; the float-bit keys
// and the mask layout are shared with the CUDA kernels (csrc/float_keys.h, csrc/mask_layout.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../float_keys.h"
#include "../mask_layout.h"

namespace dsd_kernels_cpu {

using dsd_kernels_keys::key_value;
using dsd_kernels_keys::KeyTraits;
using dsd_kernels_keys::magnitude_key;
using dsd_kernels_layout::MaskLayout;

// fn(word index, flat offset of its first element, elements in it) for every mask word, in
// parallel: the unit of work of the kernels that read or write packed masks.
template <typename F>
void parallel_for_words(const MaskLayout& lay, int64_t grain, const F& fn) {
  at::parallel_for(0, lay.num_words(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t row = w / lay.words_per_row;
      const int64_t col0 = (w - row * lay.words_per_row) * 32;
      fn(w, row * lay.cols + col0, std::min<int64_t>(32, lay.cols - col0));
    }
  });
}

}  // namespace dsd_kernels_cpu
