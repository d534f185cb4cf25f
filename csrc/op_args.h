// Argument guards shared by the compiled ops' host code (csrc/cpu and csrc/cuda): the Python ops
// check first; these guard direct calls of torch.ops.dsd_kernels_cpp.*, so that no argument can
// make a kernel read or write outside a tensor.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>

#include "mask_layout.h"

namespace dsd_kernels_args {

// `t` (the argument `name`[i]) is a contiguous tensor of p's shape, dtype and device: contiguous
// also rules out elements that share memory (an expanded tensor) and other memory orders.
inline void check_like(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, "[", i, "] must be a strided tensor");
  TORCH_CHECK(t.device() == p.device() && t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type(), op, ": ",
              name, "[", i, "] (", t.sizes(), ", ", t.scalar_type(), ", ", t.device(), ") does not match params[", i,
              "] (", p.sizes(), ", ", p.scalar_type(), ", ", p.device(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous (no shared or gapped elements), ",
              "got strides ", t.strides(), " for shape ", t.sizes());
}

// A mutated tensor shares no memory with another argument of the same parameter.
inline void check_apart(const char* op, const char* name, size_t i, const at::Tensor& t, const char* other_name,
                        const at::Tensor& other) {
  if (t.numel() == 0 || other.numel() == 0) return;
  TORCH_CHECK(at::get_overlap_status(t, other) == at::MemOverlapStatus::No, op, ": ", name, "[", i, "] and ",
              other_name, "[", i, "] share memory");
}

// Packed keep-mask words that fit `t` (csrc/mask_layout.h), on its device.
inline void check_words(const char* op, size_t i, const at::Tensor& words, const at::Tensor& t,
                        const char* tensor_name = "params") {
  TORCH_CHECK(words.device() == t.device() && words.layout() == at::kStrided && words.is_contiguous() &&
                  words.scalar_type() == at::kInt && words.numel() == dsd_kernels_layout::MaskLayout(t).num_words(),
              op, ": mask_words[", i, "] does not fit ", tensor_name, "[", i, "]: expected contiguous int32 of ",
              dsd_kernels_layout::MaskLayout(t).num_words(), " words on ", t.device());
}

}  // namespace dsd_kernels_args
