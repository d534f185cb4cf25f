// Order-preserving integer keys of |w|, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels: the float bits without the sign bit; every NaN payload is clamped to one key just
// above +inf, so NaNs tie and rank above +inf (DESIGN.md). -0.0 and 0.0 both give key 0.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace dsd_kernels_keys {

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

// Radix passes of at most 11 bits (2048 bins), balanced: fp32 11+10+10, fp16/bf16 8+7, fp64 6 x
// 10-11. Both backends use the same digits, so their histograms can be compared when debugging.
constexpr int kMaxDigitBits = 11;
template <typename scalar_t>
constexpr int radix_passes() {
  return (KeyTraits<scalar_t>::key_bits + kMaxDigitBits - 1) / kMaxDigitBits;
}
template <typename scalar_t>
C10_HOST_DEVICE constexpr int digit_width(int pass) {
  return KeyTraits<scalar_t>::key_bits / radix_passes<scalar_t>() +
         (pass < KeyTraits<scalar_t>::key_bits % radix_passes<scalar_t>() ? 1 : 0);
}

template <typename scalar_t>
C10_HOST_DEVICE inline typename KeyTraits<scalar_t>::bits_t magnitude_key(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  typename T::bits_t bits;
  memcpy(&bits, &v, sizeof(bits));
  bits &= T::abs_mask;
  return bits < T::nan_key ? bits : T::nan_key;
}

// The magnitude whose key is `key`, widened to double (exact for every float dtype).
template <typename scalar_t>
C10_HOST_DEVICE inline double key_value(typename KeyTraits<scalar_t>::bits_t key) {
  scalar_t v;
  memcpy(&v, &key, sizeof(key));
  return static_cast<double>(v);
}

}  // namespace dsd_kernels_keys
