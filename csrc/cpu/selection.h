// The pieces of the CPU magnitude selection shared by the local op (magnitude_select.cpp) and
// the sharded selection's per-shard kernels (sharded_radix.cpp, sharded_bracket.cpp, sharded_resolve.cpp): float keys, the radix passes'
// counting loops, the sampled bracket and its gathering pass, and the mask pass.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace dsd_kernels_cpu {
namespace selection {

// digits of at most 11 bits (float_keys.h): 2048 bins x 4 B x 4 sub-histograms = 32 KB per thread
constexpr int64_t kGrain = 1 << 16;

struct Selection {
  uint64_t key = 0;        // the k-th smallest key
  int64_t need = 0;        // elements equal to key that are pruned (lowest flat index first)
  int64_t count_eq = 0;    // elements equal to key
};

constexpr int kSubHists = 4;  // interleaved copies: repeated bins do not serialise on one counter

// The key of |v|; with kClamp every NaN payload becomes nan_key. Without it NaNs keep their
// own (larger) keys, which only matters when the k-th key is inf or NaN: radix_select checks
// that after the first digit and redoes the tensor with kClamp.
template <typename scalar_t, bool kClamp>
inline typename KeyTraits<scalar_t>::bits_t key_of(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  typename T::bits_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= T::abs_mask;
  if (kClamp) bits = bits < T::nan_key ? bits : T::nan_key;
  return bits;
}

// Keys whose digit 0 lies in [lo, lo + span] are gathered during pass 0: the range a sample says
// the k-th key's digit 0 is in (see candidate_digits). span = kNoRange: no range.
constexpr uint64_t kNoRange = ~uint64_t(0);

// Pass 0: count the top digit of keys[begin, end) into hist (kSubHists x bins), branch-free and
// unrolled by kSubHists, one sub-histogram per lane, so skewed data (most weights in few bins)
// does not chain on one counter. With kGather, keys whose digit is in [lo, lo + span] are also
// gathered (a well-predicted branch: few are), up to max_gather of them; past that the sample
// misjudged this data, the gathered keys are dropped and *overflow is set.
template <typename scalar_t, typename count_t, bool kClamp, bool kGather>
void count_top_digit(const scalar_t* data, int64_t begin, int64_t end, int shift, uint64_t lo,
                     uint64_t span, int64_t bins, count_t* hist,
                     std::vector<typename KeyTraits<scalar_t>::bits_t>* gather, int64_t max_gather,
                     std::atomic<bool>* overflow) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  constexpr int64_t kChunk = 4096;
  bits_t buffer[kGather ? kChunk : 1];
  // locals (not references) so the counter stores cannot alias them: they stay in registers
  const int sh = shift;
  uint64_t low = lo, width = span;
  count_t* __restrict h0 = hist;
  count_t* __restrict h1 = hist + bins;
  count_t* __restrict h2 = hist + 2 * bins;
  count_t* __restrict h3 = hist + 3 * bins;
  static_assert(kSubHists == 4, "the unrolled loop below uses four sub-histograms");
  auto count = [&](count_t* __restrict h, bits_t key, int64_t& kept) {
    h[key >> sh]++;
    if constexpr (kGather) {
      // branch-free: a few percent of random keys are in range, which a branch mispredicts
      buffer[kept] = key;
      kept += static_cast<uint64_t>(key >> sh) - low <= width;
    }
  };
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    int64_t kept = 0, i = c0;
    for (; i + 4 <= c1; i += 4) {
      count(h0, key_of<scalar_t, kClamp>(data[i]), kept);
      count(h1, key_of<scalar_t, kClamp>(data[i + 1]), kept);
      count(h2, key_of<scalar_t, kClamp>(data[i + 2]), kept);
      count(h3, key_of<scalar_t, kClamp>(data[i + 3]), kept);
    }
    for (; i < c1; ++i) count(h0, key_of<scalar_t, kClamp>(data[i]), kept);
    if constexpr (kGather) {
      if (static_cast<int64_t>(gather->size()) + kept > max_gather) {
        overflow->store(true);
        std::vector<bits_t>().swap(*gather);
        low = kNoRange;  // no digit matches from here on
        width = 0;
      } else {
        gather->insert(gather->end(), buffer, buffer + kept);
      }
    }
  }
}

// Pass 1 (when pass 0 gathered nothing usable): count the digit of the keys whose higher bits
// equal prefix, and gather them (gather may be null). A chunk's matching keys are first compacted
// into a buffer without a branch (a few percent of random keys match, which a branch would
// mispredict), then their digits are counted from the buffer.
template <typename scalar_t, typename count_t, bool kClamp>
void count_under_prefix(const scalar_t* data, int64_t begin, int64_t end, int shift,
                        uint64_t digit_mask, int high_shift, uint64_t prefix, count_t* hist,
                        std::vector<typename KeyTraits<scalar_t>::bits_t>* gather) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  constexpr int64_t kChunk = 4096;
  bits_t buffer[kChunk];
  const int sh = shift, high = high_shift;
  const uint64_t dmask = digit_mask, pre = prefix;
  count_t* __restrict h0 = hist;
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    int64_t kept = 0;
    for (int64_t i = c0; i < c1; ++i) {
      const bits_t k0 = key_of<scalar_t, kClamp>(data[i]);
      buffer[kept] = k0;
      kept += static_cast<uint64_t>(k0 >> high) == pre;
    }
    for (int64_t j = 0; j < kept; ++j) h0[(buffer[j] >> sh) & dmask]++;
    if (gather != nullptr) gather->insert(gather->end(), buffer, buffer + kept);
  }
}

template <typename scalar_t>
struct SampledBracket {
  // the calling thread's sample buffer, kept between calls (a fresh large allocation per call
  // is mapped and unmapped by the allocator, which can cost more than the sample); partly
  // reordered by the selection
  std::vector<typename KeyTraits<scalar_t>::bits_t>& sample;
  uint64_t lo = 0, hi = 0;  // the keys at the bracket's ranks
  bool from_start = false, to_end = false;  // the ranks reached an end of the sample
};

// The keys at ranks r_lo <= r_hi of `sample` (0-based, in ascending order; the sample is
// reordered). A histogram of the keys' top 11 bits (of the largest key's width) finds the bins
// holding both ranks; nth_element then runs on the keys of those bins alone, a few percent of
// a spread-out sample (on all of it where they are most of it: a narrow range, ties).
template <typename bits_t>
void sample_ranks(std::vector<bits_t>& sample, int64_t r_lo, int64_t r_hi, uint64_t* lo, uint64_t* hi) {
  constexpr int kBins = 2048;
  const auto count = static_cast<int64_t>(sample.size());
  uint64_t largest = 0;
  for (const bits_t key : sample) largest = std::max<uint64_t>(largest, key);
  int shift = 0;
  while ((largest >> shift) >= static_cast<uint64_t>(kBins)) ++shift;
  std::array<int64_t, kBins> hist{};
  for (const bits_t key : sample) hist[static_cast<uint64_t>(key) >> shift]++;
  int64_t bin_lo = -1, bin_hi = 0, under_lo = 0, through = 0;  // through: keys in bins <= bin
  for (; bin_hi < kBins; ++bin_hi) {
    if (bin_lo < 0 && through + hist[bin_hi] > r_lo) {
      bin_lo = bin_hi;
      under_lo = through;
    }
    through += hist[bin_hi];
    if (through > r_hi) break;
  }
  std::vector<bits_t>* keys = &sample;
  int64_t offset = 0;  // keys under the keys selected from
  thread_local std::vector<bits_t> between;
  if (2 * (through - under_lo) < count) {
    between.clear();
    const auto first = static_cast<uint64_t>(bin_lo), span = static_cast<uint64_t>(bin_hi - bin_lo);
    for (const bits_t key : sample) {
      if ((static_cast<uint64_t>(key) >> shift) - first <= span) between.push_back(key);
    }
    keys = &between;
    offset = under_lo;
  }
  std::nth_element(keys->begin(), keys->begin() + (r_lo - offset), keys->end());
  *lo = (*keys)[r_lo - offset];
  std::nth_element(keys->begin() + (r_lo - offset), keys->begin() + (r_hi - offset), keys->end());
  *hi = (*keys)[r_hi - offset];
}

// `samples` keys (1 <= samples <= n) read at an even stride, and the keys at the sample's ranks
// margin either side of where a key at `quantile` of the data is expected (by default 4 sqrt(S):
// 8 standard deviations of a sampled rank).
template <typename scalar_t, bool kClamp>
SampledBracket<scalar_t> sample_bracket(const scalar_t* data, int64_t n, double quantile, int64_t samples,
                                        int64_t margin = -1, int64_t run = 1) {
  thread_local std::vector<typename KeyTraits<scalar_t>::bits_t> buffer;
  SampledBracket<scalar_t> b{buffer};
  if (margin < 0) margin = static_cast<int64_t>(4 * std::sqrt(static_cast<double>(samples)));
  b.sample.resize(samples);
  // runs of `run` consecutive keys (one cache line each reads fewer lines than single keys)
  const int64_t runs = samples / run;
  const int64_t stride = n / runs;
  for (int64_t i = 0; i < runs; ++i) {
    for (int64_t j = 0; j < run; ++j) b.sample[i * run + j] = key_of<scalar_t, kClamp>(data[i * stride + j]);
  }
  const auto expected = static_cast<int64_t>(quantile * samples);
  const int64_t r_lo = std::max<int64_t>(0, expected - margin);
  const int64_t r_hi = std::min<int64_t>(samples - 1, expected + margin);
  sample_ranks(b.sample, r_lo, r_hi, &b.lo, &b.hi);
  b.from_start = r_lo == 0;
  b.to_end = r_hi == samples - 1;
  return b;
}

// the local select's sample (n >= 64): every 64th key, at most 2^16 of them, but at least 2^14
// (up to every 4th key): the bracket's share of the keys is about 8 / sqrt(samples), and a
// tensor of a few 10^5 keys (a layer's kept or pruned subset) would otherwise get a bracket
// too wide to gather
template <typename scalar_t, bool kClamp>
SampledBracket<scalar_t> sample_bracket(const scalar_t* data, int64_t n, int64_t k) {
  const int64_t samples = std::min({n / 4, std::max<int64_t>(n / 64, int64_t(1) << 14), int64_t(1) << 16});
  return sample_bracket<scalar_t, kClamp>(data, n, static_cast<double>(k) / static_cast<double>(n), samples);
}

// The range [lo, lo + span] of digit 0 that holds the k-th smallest key with near certainty
// (the digits of sample_bracket's keys). Exactness does not depend on it: the caller checks the
// chosen digit against the range and re-reads the data when it misses. Returns kNoRange as span
// when gathering would not pay (under 2^18 keys) or would keep too much (over 1/8 of the sample
// in range: few distinct digits, e.g. ties).
template <typename scalar_t, bool kClamp>
uint64_t candidate_digits(const scalar_t* data, int64_t n, int64_t k, int shift, uint64_t* lo) {
  if (n < (int64_t(1) << 18)) return kNoRange;
  const auto b = sample_bracket<scalar_t, kClamp>(data, n, k);
  const uint64_t d_lo = b.lo >> shift, d_hi = b.hi >> shift;
  int64_t in_range = 0;
  for (const auto key : b.sample) in_range += (static_cast<uint64_t>(key >> shift) - d_lo) <= d_hi - d_lo;
  if (8 * in_range > static_cast<int64_t>(b.sample.size())) return kNoRange;
  *lo = d_lo;
  return d_hi - d_lo;
}

// keys of data[0, count): *below += those under lo; those with key - lo <= width appended to out
// (which has room for count keys); returns how many were appended
template <typename scalar_t>
int64_t bracket_chunk(const scalar_t* data, int64_t count, uint64_t lo, uint64_t width, int64_t* below,
                      typename KeyTraits<scalar_t>::bits_t* out) {
  int64_t kept = 0, under = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto key = key_of<scalar_t, true>(data[i]);
    under += static_cast<uint64_t>(key) < lo;
    out[kept] = key;  // branch-free: kept only when in the bracket
    kept += static_cast<uint64_t>(key) - lo <= width;
  }
  *below += under;
  return kept;
}

#ifdef DSD_HAVE_AVX512_KERNELS
// bracket_chunk for fp32, 16 keys a step; out needs 16 keys of room past count
DSD_AVX512 inline int64_t bracket_chunk_fp32_avx512(const float* data, int64_t count, uint32_t lo, uint32_t width,
                                             int64_t* below, uint32_t* out) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int32_t>(KeyTraits<float>::nan_key));
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i span = _mm512_set1_epi32(static_cast<int32_t>(width));
  int64_t kept = 0, under = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = count - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512i bits = _mm512_maskz_loadu_epi32(lanes, data + i);
    const __m512i key = _mm512_min_epu32(_mm512_and_si512(bits, abs_mask), nan_key);
    under += __builtin_popcount(_mm512_mask_cmplt_epu32_mask(lanes, key, low));
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(lanes, _mm512_sub_epi32(key, low), span);
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(in, key));
    kept += __builtin_popcount(in);
  }
  *below += under;
  return kept;
}
#endif

// The calling thread's per-worker gather buffers, emptied but kept between calls: fresh large
// buffers are mapped by the allocator on every call, and their page faults can cost more than
// the pass. Buffers over kKeptGatherBytes are released.
constexpr size_t kKeptGatherBytes = size_t(64) << 20;

template <typename T>
std::vector<std::vector<T>>& gather_buffers(int threads) {
  thread_local std::vector<std::vector<T>> buffers;
  buffers.resize(threads);
  for (auto& b : buffers) {
    if (b.capacity() * sizeof(T) > kKeptGatherBytes) {
      std::vector<T>().swap(b);
    } else {
      b.clear();
    }
  }
  return buffers;
}

// One pass over data[0, n): *below = the keys under lo, gathered = per thread (gather_buffers,
// one per thread), the keys in [lo, hi] (clamped), *in_bracket = how many. Returns false (and stops early) when a thread would
// gather more than max_gather keys.
template <typename scalar_t>
bool gather_bracket(const scalar_t* data, int64_t n, uint64_t lo, uint64_t hi, int64_t max_gather,
                    std::vector<std::vector<typename KeyTraits<scalar_t>::bits_t>>* gathered,
                    int64_t* below, int64_t* in_bracket) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const int threads = at::get_num_threads();
  std::vector<int64_t> under(threads, 0);
  std::atomic<bool> overflow{false};
  const auto bracket_fp32 = DSD_ISA_KERNEL(bracket_chunk_fp32);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 4096;
    const int tid = at::get_thread_num();
    bits_t buffer[kChunk + 16];
    auto& mine = (*gathered)[tid];
    for (int64_t c0 = begin; c0 < end && !overflow.load(std::memory_order_relaxed); c0 += kChunk) {
      const int64_t count = std::min(end, c0 + kChunk) - c0;
      int64_t kept;
      if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef DSD_HAVE_AVX512_KERNELS
        if (cpu_has_avx512f()) {
          kept = bracket_chunk_fp32_avx512(data + c0, count, static_cast<uint32_t>(lo), static_cast<uint32_t>(hi - lo),
                                           &under[tid], buffer);
        } else
#endif
        {
          kept = bracket_fp32(data + c0, count, static_cast<uint32_t>(lo), static_cast<uint32_t>(hi - lo), &under[tid],
                              buffer);
        }
      } else {
        kept = bracket_chunk<scalar_t>(data + c0, count, lo, hi - lo, &under[tid], buffer);
      }
      if (static_cast<int64_t>(mine.size()) + kept > max_gather) {
        overflow.store(true);
        break;
      }
      mine.insert(mine.end(), buffer, buffer + kept);
    }
  });
  if (overflow.load()) return false;
  *below = *in_bracket = 0;
  for (int t = 0; t < threads; ++t) {
    *below += under[t];
    *in_bracket += static_cast<int64_t>((*gathered)[t].size());
  }
  return true;
}

// Bits (above, equal): bit j of `above` set where |src[j]| ranks above the key t, of `equal` where
// it equals t, for the len <= 32 values of one mask word. fp32 full words use SSE2 (t below
// the NaN key: NaN keys, clamped or not, are then above t and never equal it).
template <typename scalar_t>
inline void compare_word(const scalar_t* src, int64_t len, uint64_t t, uint32_t* above, uint32_t* equal) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(__SSE2__)
    if (len == 32 && t < KeyTraits<float>::nan_key) {
      const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF);
      const __m128i threshold = _mm_set1_epi32(static_cast<int32_t>(t));
      uint32_t gt = 0, eq = 0;
      for (int q = 0; q < 8; ++q) {
        const __m128i keys = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 4 * q)), abs_mask);
        gt |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, threshold)))) << (4 * q);
        eq |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(keys, threshold)))) << (4 * q);
      }
      *above = gt;
      *equal = eq;
      return;
    }
#endif
  }
  uint32_t gt = 0, eq = 0;
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t key = magnitude_key(src[j]);
    gt |= static_cast<uint32_t>(key > t) << j;
    eq |= static_cast<uint32_t>(key == t) << j;
  }
  *above = gt;
  *equal = eq;
}

// Keep-bits of mask word w: key > t, and of the keys equal to t those whose tie rank (flat order,
// counted on from *ties_before) is at least need.
template <typename scalar_t>
uint32_t ranked_word(const scalar_t* data, const MaskLayout& lay, int64_t w, uint64_t t, int64_t need,
                     int64_t* ties_before) {
  const int64_t row = w / lay.words_per_row;
  const int64_t col0 = (w - row * lay.words_per_row) * 32;
  uint32_t above, equal;
  compare_word(data + row * lay.cols + col0, std::min<int64_t>(32, lay.cols - col0), t, &above, &equal);
  for (; equal != 0; equal &= equal - 1) {  // each tie, lowest bit (flat index) first
    if ((*ties_before)++ >= need) above |= equal & (~equal + 1);
  }
  return above;
}

// up to this many ties at the threshold, the mask pass lists the words holding them instead of
// counting ties per chunk in a pass of its own
constexpr int64_t kFewTies = int64_t(1) << 16;

// bits of the len <= 32 values src[0, len) whose keys are above t
template <typename scalar_t>
inline uint32_t above_bits(const scalar_t* src, int64_t len, uint64_t t) {
  uint32_t bits = 0;
  for (int64_t j = 0; j < len; ++j) bits |= static_cast<uint32_t>(magnitude_key(src[j]) > t) << j;
  return bits;
}

template <typename scalar_t>
void write_mask(const scalar_t* data, const MaskLayout& lay, const Selection& sel, bool prune_any,
                int32_t* out) {
  const int64_t words = lay.num_words();
  uint64_t t = sel.key;
  // no tie pruned here (a shard whose ties all come after the pruned ones): keep = key >= T,
  // which is key > T - 1 (or everything for T = 0)
  if (prune_any && sel.need == 0) {
    if (t == 0) prune_any = false;
    else --t;
  }
  const bool split_ties = prune_any && sel.need > 0 && sel.need < sel.count_eq;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!split_ties && prune_any && t < KeyTraits<float>::nan_key) {
      // keep = key > t: each row's whole words in one call of the ISA kernel, a row's last,
      // partial word (cols not a multiple of 32) by the scalar loop
      const auto above_words = DSD_ISA_KERNEL(above_words_fp32);
      const int64_t whole = lay.cols / 32;
      at::parallel_for(0, words, kGrain / 32, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end;) {
          const int64_t row = w / lay.words_per_row;
          const int64_t in_row = w - row * lay.words_per_row;
          const int64_t run = std::min(end - w, whole - in_row);
          if (run > 0) {
            above_words(data + row * lay.cols + in_row * 32, run, static_cast<uint32_t>(t), out + w);
            w += run;
            continue;
          }
          out[w] = static_cast<int32_t>(above_bits(data + row * lay.cols + in_row * 32, lay.cols - in_row * 32, t));
          ++w;
        }
      });
      return;
    }
  }
  if (!split_ties) {  // keep = key > t for every element: branch-free words
    parallel_for_words(lay, kGrain / 32, [&](int64_t w, int64_t base, int64_t len) {
      if (!prune_any) {
        out[w] = static_cast<int32_t>(len == 32 ? 0xFFFFFFFFu : (1u << len) - 1u);
        return;
      }
      out[w] = static_cast<int32_t>(above_bits(data + base, len, t));
    });
    return;
  }
  // ties split: count ties per chunk, scan, then write each chunk from its offset; a word
  // without ties (nearly all) is its `above` bits, a word with ties keeps those whose tie
  // rank (flat order) is at least the ties to prune
  auto word_bits = [&](int64_t w, int64_t* ties_before) -> uint32_t {
    return ranked_word(data, lay, w, t, sel.need, ties_before);
  };
  const int64_t chunk = std::max<int64_t>(1, kGrain / 32);
  const int64_t chunks = (words + chunk - 1) / chunk;
  if (sel.count_eq <= kFewTies) {
    // few ties (the common case): one pass writes every word's `above` bits and lists the words
    // holding ties, which are then ranked in flat order and their kept ties set
    std::vector<std::vector<int64_t>> tie_words(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t w = c * chunk; w < std::min(words, (c + 1) * chunk); ++w) {
          const int64_t row = w / lay.words_per_row;
          const int64_t col0 = (w - row * lay.words_per_row) * 32;
          uint32_t above, equal;
          compare_word(data + row * lay.cols + col0, std::min<int64_t>(32, lay.cols - col0), t, &above, &equal);
          out[w] = static_cast<int32_t>(above);
          if (equal != 0) tie_words[c].push_back(w);
        }
      }
    });
    int64_t before = 0;
    for (const auto& listed : tie_words) {
      for (const int64_t w : listed) out[w] = static_cast<int32_t>(word_bits(w, &before));
    }
    return;
  }
  std::vector<int64_t> ties(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t count = 0;
      for (int64_t w = c * chunk; w < std::min(words, (c + 1) * chunk); ++w) {
        const int64_t row = w / lay.words_per_row;
        const int64_t col0 = (w - row * lay.words_per_row) * 32;
        uint32_t above, equal;
        compare_word(data + row * lay.cols + col0, std::min<int64_t>(32, lay.cols - col0), t, &above, &equal);
        count += __builtin_popcount(equal);
      }
      ties[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) ties[c + 1] += ties[c];
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t before = ties[c];
      for (int64_t w = c * chunk; w < std::min(words, (c + 1) * chunk); ++w) {
        out[w] = static_cast<int32_t>(word_bits(w, &before));
      }
    }
  });
}

}  // namespace selection
}  // namespace dsd_kernels_cpu
