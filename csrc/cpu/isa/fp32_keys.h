// The magnitude key of an fp32 value for the per-ISA kernels (the bits of |v|, every NaN one key
// above +inf: csrc/float_keys.h's order). Internal to each ISA's translation unit, as
// vec_lanes.h: a copy compiled with one ISA's flags is never called from another's.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kNanKey = 0x7F800001u;  // float_keys.h: every NaN's key

inline uint32_t fp32_key(const float* v) {
  uint32_t bits;
  std::memcpy(&bits, v, sizeof(bits));
  return std::min(bits & kAbsMask, kNanKey);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
