// Stream compaction of 32-bit lanes for each ISA: the selection's bracket pass (keys of fp32 values
// inside a range, appended in order) and mask_update's split of a tensor into its kept and pruned
// values. at::vec has no compress (nor a lane mask to scalar bits), so the AVX2 build (and the
// AVX-512 one, which has AVX2) left-packs 8 lanes at a time through a permutation table, and the
// default build (x86-64 baseline, aarch64) runs the scalar loops, branch-free.
#pragma once
#include <algorithm>
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


#if defined(__AVX2__)
// indices[m]: the positions of m's set bits, ascending, one per byte (then zeros)
struct PackIndices {
  uint64_t indices[256];
  constexpr PackIndices() : indices() {
    for (int m = 0; m < 256; ++m) {
      uint64_t packed = 0;
      int n = 0;
      for (int j = 0; j < 8; ++j) {
        if (m >> j & 1) packed |= static_cast<uint64_t>(j) << (8 * n++);
      }
      indices[m] = packed;
    }
  }
};
inline constexpr PackIndices kPackIndices{};

// the lanes of v at the set bits of m (8 bits), in order, stored from out (all 8 lanes are
// written: out needs 8 entries of room); returns how many were kept
inline int pack8(__m256i v, uint32_t m, uint32_t* out) {
  const __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kPackIndices.indices[m])));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(v, order));
  return __builtin_popcount(m);
}
#endif

// the values of src[0, len) at the set bits of m, in order, appended at out[*n]; with kRoom, out
// has room for len more and every lane is stored (branch-free: a random mask mispredicts a branch
// per lane), else only the kept ones are
template <bool kRoom>
inline void pack_scalar(const uint32_t* src, uint32_t m, int64_t len, uint32_t* out, int64_t* n) {
  for (int64_t j = 0; j < len; ++j) {
    if constexpr (kRoom) {
      out[*n] = src[j];
      *n += m >> j & 1;
    } else if (m >> j & 1) {
      out[(*n)++] = src[j];
    }
  }
}

}  // namespace

int64_t bracket_chunk_fp32(const float* data, int64_t count, uint32_t lo, uint32_t width, int64_t* below,
                           uint32_t* out) {
  int64_t kept = 0, under = 0, i = 0;
#if defined(__AVX2__)
  // keys are at most kNanKey < 2^31, so signed compares order them; key - lo <= width unsigned is
  // min(key - lo, width) == key - lo
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m256i nan_key = _mm256_set1_epi32(static_cast<int32_t>(kNanKey));
  const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(lo));
  const __m256i span = _mm256_set1_epi32(static_cast<int32_t>(width));
  for (; i + 8 <= count; i += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i));
    const __m256i key = _mm256_min_epu32(_mm256_and_si256(bits, abs_mask), nan_key);
    under += __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(low, key)))));
    const __m256i offset = _mm256_sub_epi32(key, low);
    const __m256i in = _mm256_cmpeq_epi32(_mm256_min_epu32(offset, span), offset);
    kept += pack8(key, static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in))), out + kept);
  }
#endif
  for (; i < count; ++i) {
    const uint32_t key = fp32_key(data + i);
    under += key < lo;
    out[kept] = key;  // branch-free: kept only when in the bracket
    kept += key - lo <= width;
  }
  *below += under;
  return kept;
}

void split_by_mask32(const uint32_t* kept_from, const uint32_t* pruned_from, const int32_t* words, int64_t n,
                     uint32_t* kept_out, int64_t kept_room, uint32_t* pruned_out, int64_t pruned_room) {
  int64_t nk = 0, np = 0;
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t len = std::min<int64_t>(32, n - base);
    const uint32_t bits = static_cast<uint32_t>(words[base / 32]);
    for (int64_t c = 0; c < len; c += 8) {
      const int64_t lanes = std::min<int64_t>(8, len - c);
      const uint32_t keep = (bits >> c) & 0xFFu, prune = ~bits >> c & 0xFFu & ((1u << lanes) - 1u);
#if defined(__AVX2__)
      // a whole vector's room on both sides: store 8 lanes (the extra ones are overwritten later)
      if (lanes == 8 && nk + 8 <= kept_room && np + 8 <= pruned_room) {
        nk += pack8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kept_from + base + c)), keep, kept_out + nk);
        np += pack8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pruned_from + base + c)), prune,
                    pruned_out + np);
        continue;
      }
#endif
      if (nk + 8 <= kept_room && np + 8 <= pruned_room) {
        pack_scalar<true>(kept_from + base + c, keep, lanes, kept_out, &nk);
        pack_scalar<true>(pruned_from + base + c, prune, lanes, pruned_out, &np);
      } else {
        pack_scalar<false>(kept_from + base + c, keep, lanes, kept_out, &nk);
        pack_scalar<false>(pruned_from + base + c, prune, lanes, pruned_out, &np);
      }
    }
  }
}

void popcount_scan(const int32_t* words, int64_t n, int64_t start, int64_t* before) {
  int64_t total = start;
  before[0] = total;
  for (int64_t w = 0; w < n; ++w) {
    total += __builtin_popcount(static_cast<uint32_t>(words[w]));
    before[w + 1] = total;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
