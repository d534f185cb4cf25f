// Stream compaction of 32-bit lanes for each ISA: the selection's bracket pass (keys of fp32 values
// inside a range, appended in order), the sharded selection's classify and resolve passes, and
// mask_update's split of a tensor into its kept and pruned values. at::vec has no compress (nor a lane mask to scalar bits), so the AVX2 build (and the
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
#elif defined(__SSE2__)
#include <emmintrin.h>
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

int64_t classify_words_fp32(const float* src, int64_t count, uint32_t lo, uint32_t hi, bool packed, int32_t* words,
                            uint32_t* keys, int32_t* offsets, int64_t* under) {
  int64_t kept = 0, above_count = 0;
#if defined(__AVX2__)
  // unsigned compares through min: key > hi is min(key, hi) != key; key - lo <= hi - lo is
  // min(key - lo, hi - lo) == key - lo
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m256i nan_key = _mm256_set1_epi32(static_cast<int32_t>(kNanKey));
  const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(lo));
  const __m256i top = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const __m256i span = _mm256_set1_epi32(static_cast<int32_t>(hi - lo));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto lane_bits = [](__m256i v) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(v))); };
  for (int64_t w = 0; w < count; ++w) {
    uint32_t above = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t at = 32 * w + 8 * q;
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + at));
      const __m256i key = _mm256_min_epu32(_mm256_and_si256(bits, abs_mask), nan_key);
      above |= (~lane_bits(_mm256_cmpeq_epi32(_mm256_min_epu32(key, top), key)) & 0xFFu) << (8 * q);
      const __m256i from_lo = _mm256_sub_epi32(key, low);
      const uint32_t in = lane_bits(_mm256_cmpeq_epi32(_mm256_min_epu32(from_lo, span), from_lo));
      const __m256i offset = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(at)));
      // branch-free: every vector's 8 lanes are stored, the next store starts where the kept end
      if (packed) {
        kept += pack8(_mm256_or_si256(_mm256_slli_epi32(from_lo, 12), offset), in, keys + kept);
      } else {
        pack8(key, in, keys + kept);
        kept += pack8(offset, in, reinterpret_cast<uint32_t*>(offsets) + kept);
      }
    }
    words[w] = static_cast<int32_t>(above);
    above_count += __builtin_popcount(above);
  }
#else
  for (int64_t w = 0; w < count; ++w) {
    uint32_t above = 0;
    for (int j = 0; j < 32; ++j) {
      const int64_t at = 32 * w + j;
      const uint32_t key = fp32_key(src + at);
      above |= static_cast<uint32_t>(key > hi) << j;
      if (packed) {
        keys[kept] = (key - lo) << 12 | static_cast<uint32_t>(at);
      } else {
        keys[kept] = key;
        offsets[kept] = static_cast<int32_t>(at);
      }
      kept += key - lo <= hi - lo;  // branch-free: kept only when in the bracket
    }
    words[w] = static_cast<int32_t>(above);
    above_count += __builtin_popcount(above);
  }
#endif
  *under += 32 * count - above_count - kept;  // every key is under, in or above the bracket
  return kept;
}

void split_keys32(const int32_t* key, const int32_t* pos, int64_t count, uint32_t lo, uint32_t hi, int32_t* above,
                  int64_t* num_above, int32_t* inside, int64_t* num_inside) {
  int64_t over = 0, in = 0, j = 0;
#if defined(__AVX512F__)
  // AVX-512's compress, 16 keys a step
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i span = _mm512_set1_epi32(static_cast<int32_t>(hi - lo));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= count; j += 16) {
    const __m512i k = _mm512_loadu_si512(key + j);
    const __mmask16 is_above = _mm512_cmpgt_epu32_mask(k, top);
    const __mmask16 is_in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, low), span);
    _mm512_storeu_si512(above + over, _mm512_maskz_compress_epi32(is_above, _mm512_loadu_si512(pos + j)));
    _mm512_storeu_si512(inside + in, _mm512_maskz_compress_epi32(
                                         is_in, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j)))));
    over += __builtin_popcount(is_above);
    in += __builtin_popcount(is_in);
  }
#elif defined(__AVX2__)
  const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(lo));
  const __m256i top = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const __m256i span = _mm256_set1_epi32(static_cast<int32_t>(hi - lo));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto lane_bits = [](__m256i v) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(v))); };
  for (; j + 8 <= count; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j));
    const uint32_t is_above = ~lane_bits(_mm256_cmpeq_epi32(_mm256_min_epu32(k, top), k)) & 0xFFu;
    const __m256i from_lo = _mm256_sub_epi32(k, low);
    const uint32_t is_in = lane_bits(_mm256_cmpeq_epi32(_mm256_min_epu32(from_lo, span), from_lo));
    over += pack8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + j)), is_above,
                  reinterpret_cast<uint32_t*>(above) + over);
    in += pack8(_mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(j))), is_in,
                reinterpret_cast<uint32_t*>(inside) + in);
  }
#endif
  for (; j < count; ++j) {
    const auto k = static_cast<uint32_t>(key[j]);
    above[over] = pos[j];
    over += k > hi;
    inside[in] = static_cast<int32_t>(j);
    in += k - lo <= hi - lo;
  }
  *num_above = over;
  *num_inside = in;
}

void popcount_scan(const int32_t* words, int64_t n, int64_t start, int64_t* before) {
  int64_t total = start;
  before[0] = total;
  for (int64_t w = 0; w < n; ++w) {
    total += __builtin_popcount(static_cast<uint32_t>(words[w]));
    before[w + 1] = total;
  }
}

// The selection's mask pass (selection.h write_mask) over `words` whole mask words of fp32 values:
// out[w] = the bits of the keys of src[32 w, 32 w + 32) above t (t below the NaN key: every NaN,
// clamped or not, is above it). Keys are under 2^31, so signed compares are exact. AVX-512: two
// compares straight to lane masks; AVX2: four compares narrowed to bytes (packs) and one movemask,
// where SSE2 needs eight movemasks and shifts; the default build: SSE2 on x86-64, else scalar.
void above_words_fp32(const float* src, int64_t words, uint32_t t, int32_t* out) {
#if defined(__AVX512F__)
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m512i threshold = _mm512_set1_epi32(static_cast<int32_t>(t));
  for (int64_t w = 0; w < words; ++w) {
    const int32_t* at = reinterpret_cast<const int32_t*>(src + 32 * w);
    const __m512i lo = _mm512_and_si512(_mm512_loadu_si512(at), abs_mask);
    const __m512i hi = _mm512_and_si512(_mm512_loadu_si512(at + 16), abs_mask);
    const uint32_t bits = static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(lo, threshold)) |
                          static_cast<uint32_t>(_mm512_cmpgt_epi32_mask(hi, threshold)) << 16;
    out[w] = static_cast<int32_t>(bits);
  }
#elif defined(__AVX2__)
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m256i threshold = _mm256_set1_epi32(static_cast<int32_t>(t));
  // packs interleaves the 128-bit halves: after the two narrowing steps the 4-byte groups hold
  // elements 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31; this puts them in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t w = 0; w < words; ++w) {
    const __m256i* at = reinterpret_cast<const __m256i*>(src + 32 * w);
    __m256i above[4];
    for (int q = 0; q < 4; ++q) {
      above[q] = _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_loadu_si256(at + q), abs_mask), threshold);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(above[0], above[1]),
                                             _mm256_packs_epi32(above[2], above[3]));
    out[w] = _mm256_movemask_epi8(_mm256_permutevar8x32_epi32(bytes, order));
  }
#elif defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(static_cast<int32_t>(kAbsMask));
  const __m128i threshold = _mm_set1_epi32(static_cast<int32_t>(t));
  for (int64_t w = 0; w < words; ++w) {
    uint32_t bits = 0;
    for (int q = 0; q < 8; ++q) {
      const __m128i keys = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * w + 4 * q)),
                                         abs_mask);
      bits |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, threshold)))) << (4 * q);
    }
    out[w] = static_cast<int32_t>(bits);
  }
#else
  for (int64_t w = 0; w < words; ++w) {
    uint32_t bits = 0;
    for (int j = 0; j < 32; ++j) {
      uint32_t key;
      std::memcpy(&key, src + 32 * w + j, sizeof(key));
      bits |= static_cast<uint32_t>((key & kAbsMask) > t) << j;
    }
    out[w] = static_cast<int32_t>(bits);
  }
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
