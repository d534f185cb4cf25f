// Shared helpers of the CPU kernels: the packed-mask layout and float-bit keys.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dsd_kernels_cpu {

// Packed-mask layout (DESIGN.md): rows = shape[0] for >= 2-D tensors (1 otherwise),
// cols = numel / rows, words_per_row = ceil(cols / 32), bit j of word w = column 32*w + j.
struct MaskLayout {
  int64_t rows, cols, words_per_row;
  explicit MaskLayout(const at::Tensor& t) {
    rows = t.dim() >= 2 ? t.size(0) : 1;
    cols = rows ? t.numel() / rows : 0;
    words_per_row = (cols + 31) / 32;
  }
  int64_t num_words() const { return rows * words_per_row; }
};

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

// Order-preserving keys of |w|: the float bits without the sign bit; every NaN payload is
// clamped to one key just above +inf so NaNs tie and rank above +inf.
template <typename scalar_t> struct KeyTraits;
template <> struct KeyTraits<float> {
  using bits_t = uint32_t;
  static constexpr int key_bits = 31;
  static constexpr bits_t abs_mask = 0x7FFFFFFFu, nan_key = 0x7F800001u;
};
template <> struct KeyTraits<double> {
  using bits_t = uint64_t;
  static constexpr int key_bits = 63;
  static constexpr bits_t abs_mask = 0x7FFFFFFFFFFFFFFFull, nan_key = 0x7FF0000000000001ull;
};
template <> struct KeyTraits<c10::Half> {
  using bits_t = uint16_t;
  static constexpr int key_bits = 15;
  static constexpr bits_t abs_mask = 0x7FFF, nan_key = 0x7C01;
};
template <> struct KeyTraits<c10::BFloat16> {
  using bits_t = uint16_t;
  static constexpr int key_bits = 15;
  static constexpr bits_t abs_mask = 0x7FFF, nan_key = 0x7F81;
};

template <typename scalar_t>
inline typename KeyTraits<scalar_t>::bits_t magnitude_key(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  typename T::bits_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= T::abs_mask;
  return bits < T::nan_key ? bits : T::nan_key;
}

template <typename scalar_t>
inline double key_value(typename KeyTraits<scalar_t>::bits_t key) {
  scalar_t v;
  std::memcpy(&v, &key, sizeof(key));
  return static_cast<double>(v);
}

}  // namespace dsd_kernels_cpu
