// The re-masking pass (apply_masks) of fp32 rows for each ISA: a mask word that keeps everything is
// neither read nor written, a vector that keeps nothing is stored as +0 without a read, and the
// others are AND-ed with their lanes (a pruned entry becomes exactly +0 whatever it held).
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {

void zero_pruned_fp32(float* data, const int32_t* words, int64_t n) {
  for (int64_t c0 = 0; c0 < n; c0 += 32) {
    const uint32_t word = static_cast<uint32_t>(words[c0 / 32]);
    const int64_t len = std::min<int64_t>(32, n - c0);
    if (word == 0xFFFFFFFFu) continue;  // all kept: neither read nor written
    for (int64_t c = c0; c < c0 + len; c += kLanes) {
      const int64_t lanes = std::min<int64_t>(kLanes, c0 + len - c);
      const uint32_t bits = word >> (c - c0);
      if ((bits & ((1u << lanes) - 1u)) == 0) {
        store_first(Vec(0.0f), data + c, lanes);  // nothing kept: +0 stored, nothing read
      } else {
        store_first(load_first(data + c, lanes) & keep_lanes(bits), data + c, lanes);
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
