// 2:4 masks of fp32 rows for each ISA (nm_masks.cpp): every 4 consecutive weights keep their 2
// largest |w|, ranked by integer keys of |w| (NaN above +inf, -0.0 == 0.0) with the selection's
// tie rule (equal keys: the lower index is pruned first), so a weight is kept when at least 2
// others of its group rank below it. at::vec has no in-lane rotation, so the AVX2 build (and the
// AVX-512 one) rotates each 128-bit lane, one group of 4 keys, with shuffle_epi32 and counts the
// others below every key in 3 compares; the default build runs the scalar comparisons.
#pragma once
#include <cstdint>
#include <cstring>

#include "fp32_keys.h"
#include "isa_kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

// bits [0, 4): which of the 4 weights at w are kept
inline uint32_t keep_group_2_4(const float* w) {
  const uint32_t k0 = fp32_key(w), k1 = fp32_key(w + 1), k2 = fp32_key(w + 2), k3 = fp32_key(w + 3);
  const int b0 = (k1 < k0) + (k2 < k0) + (k3 < k0);  // others below: smaller, or equal at a lower index
  const int b1 = (k0 <= k1) + (k2 < k1) + (k3 < k1);
  const int b2 = (k0 <= k2) + (k1 <= k2) + (k3 < k2);
  const int b3 = (k0 <= k3) + (k1 <= k3) + (k2 <= k3);
  return static_cast<uint32_t>(b0 >= 2) | (static_cast<uint32_t>(b1 >= 2) << 1) |
         (static_cast<uint32_t>(b2 >= 2) << 2) | (static_cast<uint32_t>(b3 >= 2) << 3);
}

#if defined(__AVX2__)
// bits [0, 8): the two groups of 4 at w
inline uint32_t keep_8_2_4(const float* w) {
  const __m256i keys = _mm256_min_epu32(
      _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi32(static_cast<int32_t>(kAbsMask))),
      _mm256_set1_epi32(static_cast<int32_t>(kNanKey)));
  // element i of a group sees key (i + r) % 4; that is a lower index in the lanes i >= 4 - r, where
  // an equal key also counts as below (keys < 2^31: signed compares order them)
  const __m256i rotated[3] = {_mm256_shuffle_epi32(keys, 0x39), _mm256_shuffle_epi32(keys, 0x4E),
                              _mm256_shuffle_epi32(keys, 0x93)};
  const __m256i lower[3] = {_mm256_setr_epi32(0, 0, 0, -1, 0, 0, 0, -1), _mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1),
                            _mm256_setr_epi32(0, -1, -1, -1, 0, -1, -1, -1)};
  __m256i below = _mm256_setzero_si256();
  for (int r = 0; r < 3; ++r) {
    const __m256i lt = _mm256_cmpgt_epi32(keys, rotated[r]);
    const __m256i eq = _mm256_and_si256(_mm256_cmpeq_epi32(keys, rotated[r]), lower[r]);
    below = _mm256_sub_epi32(below, _mm256_or_si256(lt, eq));  // all ones: -1, so subtracting counts it
  }
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(below, _mm256_set1_epi32(1)))));
}
#endif

}  // namespace

void words_2_4_fp32(const float* w, int32_t* out, int64_t words) {
  for (int64_t k = 0; k < words; ++k) {
    const float* src = w + 32 * k;
    uint32_t bits = 0;
#if defined(__AVX2__)
    for (int v = 0; v < 4; ++v) bits |= keep_8_2_4(src + 8 * v) << (8 * v);
#else
    for (int g = 0; g < 8; ++g) bits |= keep_group_2_4(src + 4 * g) << (4 * g);
#endif
    out[k] = static_cast<int32_t>(bits);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
