// What the per-ISA kernels share: fp32 vectors of this ISA (at::vec::Vectorized<float>), loads and
// stores of a row's first lanes, and the lanes of packed mask words. Included by the kernel headers
// of this folder after the ISA source set CPU_CAPABILITY; everything here is internal to that
// ISA's translation unit (an anonymous namespace inside isa::CPU_CAPABILITY).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa_kernels.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int kLanes = Vec::size();
static_assert(32 % kLanes == 0, "a vector must lie in one mask word");
#if defined(__aarch64__) && defined(CPU_CAPABILITY_DEFAULT)
// the portable kernels on ARM are NEON code, not at::vec's generic (scalar-array) vectors; the
// aarch64 cross build in the tests (tests/test_aarch64_build.py) holds this
static_assert(kLanes == 4, "the default build on aarch64 must get at::vec's NEON Vectorized<float>");
#endif

// lanes [0, n) of src, 0 in the others (n in [0, kLanes]); reads nothing past src + n
inline Vec load_first(const float* src, int64_t n) {
  if (n == kLanes) return Vec::loadu(src);
  if (n <= 0) return Vec(0.0f);
  return Vec::loadu(src, n);
}

inline void store_first(const Vec& v, float* dst, int64_t n) {
  if (n == kLanes) {
    v.store(dst);
  } else if (n > 0) {
    v.store(dst, n);
  }
}

// The 8 lanes of each byte value: all ones where its bit is set
struct ByteLanes {
  int32_t lanes[256][8];
  constexpr ByteLanes() : lanes() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int j = 0; j < 8; ++j) lanes[byte][j] = (byte >> j) & 1 ? -1 : 0;
    }
  }
};
inline constexpr ByteLanes kByteLanes{};

// all-ones lanes where bit j of `bits` is set, zeros elsewhere: AND-ing gives exactly +0 where
// pruned, whatever the value (NaN included). A table read per 8 lanes.
inline Vec keep_lanes(uint32_t bits) {
  alignas(64) int32_t lanes[kLanes];
  for (int b = 0; b < kLanes; b += 8) {
    std::memcpy(lanes + b, kByteLanes.lanes[(bits >> b) & 0xFFu], sizeof(int32_t) * std::min(8, kLanes - b));
  }
  return Vec::loadu(lanes);
}

// the keep bits of columns [c, c + kLanes) of a row of mask words, in the low bits
inline uint32_t keep_bits(const int32_t* words, int64_t c) {
  return static_cast<uint32_t>(words[c / 32]) >> (c % 32);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
