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

using IntVec = at::vec::Vectorized<int32_t>;
static_assert(IntVec::size() == kLanes, "int32 and fp32 vectors of one ISA have the same lanes");

// lane j holds 1 << j: the bit of a mask word (shifted to the vector's first column) that keeps it
struct LaneBits {
  int32_t bits[kLanes];
  constexpr LaneBits() : bits() {
    for (int j = 0; j < kLanes; ++j) bits[j] = static_cast<int32_t>(1u << j);
  }
};
inline constexpr LaneBits kLaneBits{};

// all-ones lanes where bit j of `bits` is set, zeros elsewhere: AND-ing gives exactly +0 where
// pruned, whatever the value (NaN included). In registers (broadcast, AND, compare): a table read
// through the stack stalled on store forwarding once per vector.
inline Vec keep_lanes(uint32_t bits) {
  const IntVec lane_bits = IntVec::loadu(kLaneBits.bits);
  const IntVec set = IntVec(static_cast<int32_t>(bits)) & lane_bits;
  return at::vec::cast<float>(set == lane_bits);
}

// the keep bits of columns [c, c + kLanes) of a row of mask words, in the low bits
inline uint32_t keep_bits(const int32_t* words, int64_t c) {
  return static_cast<uint32_t>(words[c / 32]) >> (c % 32);
}

// whether data[0, len) holds anything but +0 (as bits: -0.0 and NaN count)
inline bool any_bits(const float* data, int64_t len) {
  Vec any(0.0f);
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) any = any | Vec::loadu(data + c);
  alignas(64) int32_t lanes[kLanes];
  any.store(lanes);
  int32_t bits = 0;
  for (int j = 0; j < kLanes; ++j) bits |= lanes[j];
  for (; c < len; ++c) {
    int32_t v;
    std::memcpy(&v, data + c, sizeof(v));
    bits |= v;
  }
  return bits != 0;
}

inline void clear_if_set(float* data, int64_t len) {
  if (any_bits(data, len)) std::fill(data, data + len, 0.0f);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
