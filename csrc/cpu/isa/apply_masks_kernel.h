// The re-masking pass (apply_masks) of fp32 rows for each ISA: a mask word that keeps everything is
// neither read nor written, a word that keeps nothing is stored as +0 without a read, and the
// others are AND-ed with their lanes (a pruned entry becomes exactly +0 whatever it held).
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {

void zero_pruned_fp32(float* data, const int32_t* words, int64_t n) {
  constexpr int kVecsPerWord = 32 / kLanes;
  const int64_t full = n / 32 * 32;
  for (int64_t c0 = 0; c0 < full; c0 += 32) {  // whole words: no lane counts, no partial loads
    const uint32_t word = static_cast<uint32_t>(words[c0 / 32]);
    if (word == 0xFFFFFFFFu) continue;  // all kept: neither read nor written
    float* row = data + c0;
    if (word == 0) {  // nothing kept: +0 stored, nothing read
      for (int j = 0; j < kVecsPerWord; ++j) Vec(0.0f).store(row + j * kLanes);
      continue;
    }
    for (int j = 0; j < kVecsPerWord; ++j) {
      (Vec::loadu(row + j * kLanes) & keep_lanes(word >> (j * kLanes))).store(row + j * kLanes);
    }
  }
  if (full == n) return;
  const uint32_t word = static_cast<uint32_t>(words[full / 32]);
  for (int64_t c = full; c < n; c += kLanes) {  // the last, partial word
    const int64_t lanes = std::min<int64_t>(kLanes, n - c);
    store_first(load_first(data + c, lanes) & keep_lanes(word >> (c - full)), data + c, lanes);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
