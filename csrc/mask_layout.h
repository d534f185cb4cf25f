// The packed-mask layout, shared by the CPU and CUDA kernels' host code.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dsd_kernels_layout {

// Packed-mask layout (DESIGN.md): rows = shape[0] for >= 2-D tensors (1 otherwise),
// cols = numel / rows, words_per_row = ceil(cols / 32), bit j of word w = column 32*w + j.
struct MaskLayout {
  int64_t rows, cols, words_per_row;
  explicit MaskLayout(const at::Tensor& t) {
    rows = t.dim() >= 2 ? t.size(0) : 1;
    cols = rows ? t.numel() / rows : 0;
    words_per_row = (cols + 31) / 32;
  }
  // the layout of rows x cols values (a 1-D subset: 1 row)
  MaskLayout(int64_t num_rows, int64_t num_cols)
      : rows(num_rows), cols(num_cols), words_per_row((num_cols + 31) / 32) {}
  int64_t num_words() const { return rows * words_per_row; }
};

}  // namespace dsd_kernels_layout
