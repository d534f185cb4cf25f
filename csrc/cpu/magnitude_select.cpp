// Exact magnitude selection on CPU: multithreaded radix select over the float bits.
//
// Tensors of 2^18 keys or more first try a bracket select (bracket_select below): one pass that
// counts the keys under a sampled bracket of the k-th key and gathers those inside it; it is
// exact whenever the bracket holds the k-th key (checked), and the radix select runs otherwise.
//
// Radix select, per tensor: 11-bit digit histograms (per-thread, L1-resident, merged), most significant
// first. Pass 0 reads every key, and also gathers the keys whose top digit lies in the range
// that a 2^16-key strided sample predicts for the k-th key; if the chosen top digit is in that
// range, later digits visit only the gathered keys (one pass over memory). If not, or for small
// tensors, pass 1 reads every key again, counts those under the chosen top digit and gathers
// them. So any dtype takes one pass over memory, at most two (fp16/bf16: digits of 8 and 7 bits). The mask pass then writes the
// packed keep-words directly: key > T, or key == T with tie rank (flat order) >= the
// ties still to prune; tie ranks come from per-chunk counts and an exclusive scan, and
// are only computed when some but not all ties at T are pruned.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
namespace {

// digits of at most 11 bits (float_keys.h): 2048 bins x 4 B x 4 sub-histograms = 32 KB per thread
constexpr int64_t kGrain = 1 << 16;

struct Selection {
  uint64_t key = 0;        // the k-th smallest key
  int64_t need = 0;        // elements equal to key that are pruned (lowest flat index first)
  int64_t count_eq = 0;    // elements equal to key
};

// Find the bin holding the rank-th smallest element; updates rank to the rank within the bin.
template <typename count_t>
int64_t locate(const std::vector<count_t>& local, int threads, int64_t bins, int64_t* rank,
               int64_t* in_bin) {
  int64_t below = 0, digit = 0;
  for (; digit < bins; ++digit) {
    int64_t c = 0;
    for (int t = 0; t < threads; ++t) c += static_cast<int64_t>(local[static_cast<size_t>(t) * bins + digit]);
    if (below + c >= *rank) {
      *in_bin = c;
      break;
    }
    below += c;
  }
  *rank -= below;
  return digit;
}

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
      kept += (k0 >> high) == pre;
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
  std::nth_element(b.sample.begin(), b.sample.begin() + r_lo, b.sample.end());
  b.lo = b.sample[r_lo];
  std::nth_element(b.sample.begin() + r_lo, b.sample.begin() + r_hi, b.sample.end());
  b.hi = b.sample[r_hi];
  b.from_start = r_lo == 0;
  b.to_end = r_hi == samples - 1;
  return b;
}

// the local select's sample: every 64th key, at most 2^16 of them (n >= 64)
template <typename scalar_t, bool kClamp>
SampledBracket<scalar_t> sample_bracket(const scalar_t* data, int64_t n, int64_t k) {
  return sample_bracket<scalar_t, kClamp>(data, n, static_cast<double>(k) / static_cast<double>(n),
                                          std::min<int64_t>(n / 64, int64_t(1) << 16));
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

// Pass 0 reads every key for digit 0 and gathers (per thread) the keys in the sampled range of
// digit 0. If the chosen digit 0 is in that range, every later digit visits only gathered keys:
// one pass over memory. Otherwise pass 1 reads every key again, counts those under the chosen
// digit 0 and gathers them for the later digits: two passes.
template <typename scalar_t, typename count_t, bool kClamp>
bool radix_select_pass(const scalar_t* data, int64_t n, int64_t k, Selection* sel) {
  using T = KeyTraits<scalar_t>;
  using bits_t = typename T::bits_t;
  const int passes = dsd_kernels_keys::radix_passes<scalar_t>();
  const int threads = at::get_num_threads();
  int64_t rank = k;
  uint64_t prefix = 0;
  int shift = T::key_bits;
  std::vector<std::vector<bits_t>> gathered(threads);
  bool have_candidates = false;  // gathered holds every key under the chosen prefix
  std::atomic<bool> overflow{false};
  // the 1/8 of the keys that candidate_digits allows, per thread's share: a sampling miss
  // costs at most 1/8 of the tensor's bytes of memory
  const int64_t max_gather = n / (8 * threads) + 4096;
  for (int p = 0; p < passes; ++p) {
    const int width = dsd_kernels_keys::digit_width<scalar_t>(p);
    shift -= width;
    const int64_t bins = int64_t(1) << width;
    const uint64_t digit_mask = bins - 1;
    const int high_shift = shift + width;
    std::vector<count_t> local(static_cast<size_t>(threads) * kSubHists * bins, 0);
    uint64_t lo = 0, span = kNoRange;
    if (p == 0 && passes > 1) span = candidate_digits<scalar_t, kClamp>(data, n, k, shift, &lo);
    if (p == 0 || (p == 1 && !have_candidates)) {
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        const int tid = at::get_thread_num();
        count_t* hist = local.data() + static_cast<int64_t>(tid) * kSubHists * bins;
        if (p == 0 && span != kNoRange) {
          count_top_digit<scalar_t, count_t, kClamp, true>(data, begin, end, shift, lo, span, bins,
                                                           hist, &gathered[tid], max_gather, &overflow);
        } else if (p == 0) {
          count_top_digit<scalar_t, count_t, kClamp, false>(data, begin, end, shift, lo, span, bins,
                                                            hist, nullptr, 0, nullptr);
        } else {
          count_under_prefix<scalar_t, count_t, kClamp>(data, begin, end, shift, digit_mask,
                                                        high_shift, prefix, hist,
                                                        passes > 2 ? &gathered[tid] : nullptr);
        }
      });
      if (p == 1) have_candidates = passes > 2;
    } else {
      // the gathered keys are few: each thread counts its own gathered keys
      at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          count_t* hist = local.data() + t * kSubHists * bins;
          for (const bits_t key : gathered[t]) {
            hist[(key >> shift) & digit_mask] += (key >> high_shift) == prefix;
          }
        }
      });
    }
    const int64_t digit = locate(local, threads * kSubHists, bins, &rank, &sel->count_eq);
    prefix = (prefix << width) | static_cast<uint64_t>(digit);
    if (!kClamp && p == 0 && static_cast<uint64_t>(digit) >= (T::nan_key - 1) >> shift) {
      return false;  // the k-th key is inf or NaN: NaN payloads must tie, redo with clamping
    }
    if (p == 0) {
      have_candidates = span != kNoRange && !overflow.load() && static_cast<uint64_t>(digit) - lo <= span;
      if (!have_candidates) {
        for (auto& g : gathered) std::vector<bits_t>().swap(g);  // a sampling miss: re-read
      }
    }
  }
  sel->key = prefix;
  sel->need = rank;
  return true;
}

// ---------------------------------------------------------------- bracket select
// A sample of the keys brackets the k-th one: [lo, hi] from the sample's ranks 4 sqrt(S) either
// side of the k-th's expected rank. One pass over memory then counts the keys below lo and
// gathers those in [lo, hi] (a few percent of random data) without a histogram's scattered
// increments, and the k-th key is selected among the gathered ones. Exact whenever the k-th key
// lies in the bracket (checked from the counts); otherwise, or when the bracket would hold over
// 1/8 of the keys (ties), the caller runs the radix select.

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
DSD_AVX512 int64_t bracket_chunk_fp32_avx512(const float* data, int64_t count, uint32_t lo, uint32_t width,
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
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kChunk = 4096;
    const int tid = at::get_thread_num();
    bits_t buffer[kChunk + 16];
    auto& mine = (*gathered)[tid];
    for (int64_t c0 = begin; c0 < end && !overflow.load(std::memory_order_relaxed); c0 += kChunk) {
      const int64_t count = std::min(end, c0 + kChunk) - c0;
      int64_t kept;
#ifdef DSD_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<scalar_t, float>) {
        kept = cpu_has_avx512f()
            ? bracket_chunk_fp32_avx512(data + c0, count, static_cast<uint32_t>(lo), static_cast<uint32_t>(hi - lo),
                                        &under[tid], buffer)
            : bracket_chunk<scalar_t>(data + c0, count, lo, hi - lo, &under[tid], buffer);
      } else {
        kept = bracket_chunk<scalar_t>(data + c0, count, lo, hi - lo, &under[tid], buffer);
      }
#else
      kept = bracket_chunk<scalar_t>(data + c0, count, lo, hi - lo, &under[tid], buffer);
#endif
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

template <typename scalar_t>
bool bracket_select(const scalar_t* data, int64_t n, int64_t k, Selection* sel) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  if (n < (int64_t(1) << 18) || k < 1) return false;
  const auto b = sample_bracket<scalar_t, true>(data, n, k);
  const uint64_t lo = b.from_start ? 0 : b.lo;  // the bracket reaches the ends of the key range
  const uint64_t hi = b.to_end ? KeyTraits<scalar_t>::nan_key : b.hi;
  int64_t in_sample = 0;
  for (const bits_t key : b.sample) in_sample += static_cast<uint64_t>(key) - lo <= hi - lo;
  if (8 * in_sample > static_cast<int64_t>(b.sample.size())) {
    return false;  // ties: the radix select handles them without gathering
  }
  auto& gathered = gather_buffers<bits_t>(at::get_num_threads());
  int64_t under = 0, in_bracket = 0;
  const int64_t max_gather = n / (8 * at::get_num_threads()) + 4096;
  if (!gather_bracket(data, n, lo, hi, max_gather, &gathered, &under, &in_bracket)) return false;
  if (!(under < k && k <= under + in_bracket)) return false;  // a sampling miss
  // the rank-th gathered key: a histogram of (key - lo) in at most 4096 buckets, then a
  // selection among the one bucket's keys (every key equal to the k-th lands in that bucket)
  const uint64_t width = hi - lo;
  int shift = 0;
  while ((width >> shift) >= 4096) ++shift;
  std::vector<int64_t> hist(static_cast<size_t>(width >> shift) + 1, 0);
  for (const auto& g : gathered) {
    for (const bits_t key : g) hist[(static_cast<uint64_t>(key) - lo) >> shift]++;
  }
  int64_t rank = k - under;  // 1-based among the gathered keys
  size_t bucket = 0;
  for (; rank > hist[bucket]; ++bucket) rank -= hist[bucket];
  std::vector<bits_t> keys;
  keys.reserve(static_cast<size_t>(hist[bucket]));
  for (const auto& g : gathered) {
    for (const bits_t key : g) {
      if (((static_cast<uint64_t>(key) - lo) >> shift) == bucket) keys.push_back(key);
    }
  }
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end());
  const bits_t t = keys[rank - 1];
  int64_t less = 0, equal = 0;
  for (const bits_t key : keys) {
    less += key < t;
    equal += key == t;
  }
  sel->key = t;
  sel->need = rank - less;  // the keys of lower buckets are all below t
  sel->count_eq = equal;
  return true;
}

template <typename scalar_t>
Selection radix_select(const scalar_t* data, int64_t n, int64_t k) {
  // 32-bit counters halve the histograms' cache footprint; 64-bit ones beyond 2^32 elements
  Selection sel;
  if (bracket_select<scalar_t>(data, n, k, &sel)) return sel;
  sel = Selection();
  if (n < (int64_t(1) << 32)) {
    if (!radix_select_pass<scalar_t, uint32_t, false>(data, n, k, &sel)) {
      sel = Selection();
      radix_select_pass<scalar_t, uint32_t, true>(data, n, k, &sel);
    }
  } else if (!radix_select_pass<scalar_t, int64_t, false>(data, n, k, &sel)) {
    sel = Selection();
    radix_select_pass<scalar_t, int64_t, true>(data, n, k, &sel);
  }
  return sel;
}

// Bit j set where |src[j]| ranks above the key t, for 32 floats; t must be below the NaN key
// (every NaN key is above it then, clamped or not). SSE2 where available: 8 compares and
// movemasks instead of 32 scalar compares and shifts (the compiler does not vectorise the latter).
inline uint32_t keep_word_fp32(const float* src, uint32_t t) {
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF);
  const __m128i threshold = _mm_set1_epi32(static_cast<int32_t>(t));  // keys < 2^31: signed compare
  uint32_t bits = 0;
  for (int q = 0; q < 8; ++q) {
    const __m128i keys = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 4 * q)), abs_mask);
    bits |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, threshold)))) << (4 * q);
  }
  return bits;
#else
  uint32_t bits = 0;
  for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(magnitude_key(src[j]) > t) << j;
  return bits;
#endif
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
  if (!split_ties) {  // keep = key > t for every element: branch-free words
    parallel_for_words(lay, kGrain / 32, [&](int64_t w, int64_t base, int64_t len) {
      if (!prune_any) {
        out[w] = static_cast<int32_t>(len == 32 ? 0xFFFFFFFFu : (1u << len) - 1u);
        return;
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (len == 32 && t < KeyTraits<float>::nan_key) {
          out[w] = static_cast<int32_t>(keep_word_fp32(data + base, static_cast<uint32_t>(t)));
          return;
        }
      }
      uint32_t bits = 0;
      for (int64_t j = 0; j < len; ++j) bits |= static_cast<uint32_t>(magnitude_key(data[base + j]) > t) << j;
      out[w] = static_cast<int32_t>(bits);
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

template <typename scalar_t>
void select_one(const at::Tensor& t, double sparsity, bool want_masks, double* threshold,
                std::vector<at::Tensor>& masks) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  const int64_t k = static_cast<int64_t>(std::nearbyint(sparsity * static_cast<double>(n)));
  const scalar_t* data = c.data_ptr<scalar_t>();
  Selection sel;
  if (k > 0) {
    sel = radix_select<scalar_t>(data, n, k);
    *threshold = key_value<scalar_t>(static_cast<typename KeyTraits<scalar_t>::bits_t>(sel.key));
  } else {
    *threshold = -std::numeric_limits<double>::infinity();
  }
  if (want_masks) {
    MaskLayout lay(c);
    at::Tensor out = at::empty({lay.rows, lay.words_per_row}, c.options().dtype(at::kInt));
    if (lay.num_words() > 0) write_mask<scalar_t>(data, lay, sel, k > 0, out.data_ptr<int32_t>());
    masks.push_back(out);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> magnitude_select(
    at::TensorList tensors, at::ArrayRef<double> sparsities, bool want_masks) {
  TORCH_CHECK(tensors.size() == sparsities.size(), "magnitude_select: ", tensors.size(),
              " tensors but ", sparsities.size(), " sparsities");
  at::Tensor thresholds = at::empty({static_cast<int64_t>(tensors.size())}, at::kDouble);
  double* th = thresholds.data_ptr<double>();
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "magnitude_select: tensors[", i, "] is not a CPU tensor");
    TORCH_CHECK(sparsities[i] >= 0.0 && sparsities[i] <= 1.0, "magnitude_select: sparsities[", i,
                "] must be in [0, 1], got ", sparsities[i]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "magnitude_select",
                                    [&] { select_one<scalar_t>(t, sparsities[i], want_masks, th + i, masks); });
  }
  return {thresholds, masks};
}

// ---------------------------------------------------------------- sharded selection
// distributed.py runs the radix passes of a selection over weights sharded across processes:
// per pass, each process histograms its shards here, the histograms are summed across
// processes, and the digit is located from the sum. These two ops are its per-shard kernels.

// One radix pass over float values: the digit (key >> shift) & (2^width - 1) of the keys whose
// higher bits (key >> (shift + width)) equal prefix, added to out_row (2^width counters); with
// gather, those keys are also returned (in no particular order) for the later passes. The first
// pass (no higher bits) cannot know the digit yet: with gather and a quantile (k/n of the global
// selection) it gathers, as the local select does, the keys whose digit lies in the range a
// sample of this shard predicts, and reports the range in *range_lo / *range_span (span kNoRange:
// nothing gathered; the caller re-reads the values if the chosen digit falls outside).
template <typename scalar_t, typename count_t>
at::Tensor histogram_values(const at::Tensor& src, uint64_t prefix, int shift, int width, bool gather,
                            double quantile, int64_t* out_row, uint64_t* range_lo,
                            uint64_t* range_span) {
  using T = KeyTraits<scalar_t>;
  using bits_t = typename T::bits_t;
  const at::Tensor c = src.contiguous();
  const scalar_t* data = c.data_ptr<scalar_t>();
  const int64_t n = c.numel();
  const int threads = at::get_num_threads();
  const int64_t bins = int64_t(1) << width;
  const int high_shift = shift + width;
  const bool whole = high_shift >= T::key_bits;  // no higher bits: every key counts
  std::vector<count_t> local(static_cast<size_t>(threads) * kSubHists * bins, 0);
  std::vector<std::vector<bits_t>> kept(threads);
  uint64_t lo = 0, span = kNoRange;
  if (whole && gather && quantile > 0.0 && n > 0) {
    const auto k = std::clamp<int64_t>(static_cast<int64_t>(std::nearbyint(quantile * static_cast<double>(n))),
                                       1, n);
    span = candidate_digits<scalar_t, true>(data, n, k, shift, &lo);
  }
  std::atomic<bool> overflow{false};
  const int64_t max_gather = n / (8 * threads) + 4096;  // as the local select allows
  // Unclamped keys are cheaper to count (the clamp slows these loops down): NaN keys then
  // spread over the top bins above +inf's, folded into the NaN key's bin below; and under a
  // prefix below +inf's no NaN key can match. Keys gathered in the first pass are clamped as
  // they are copied out (later passes read them).
  // One parallel loop per variant: a loop body holding several variants runs slower.
  auto hist_of = [&]() {
    return local.data() + static_cast<int64_t>(at::get_thread_num()) * kSubHists * bins;
  };
  if (whole && span != kNoRange) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_top_digit<scalar_t, count_t, false, true>(data, begin, end, shift, lo, span, bins, hist_of(),
                                                      &kept[at::get_thread_num()], max_gather, &overflow);
    });
  } else if (whole) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_top_digit<scalar_t, count_t, false, false>(data, begin, end, shift, 0, kNoRange, bins,
                                                       hist_of(), nullptr, 0, nullptr);
    });
  } else if (prefix < static_cast<uint64_t>(T::nan_key - 1) >> high_shift) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_under_prefix<scalar_t, count_t, false>(data, begin, end, shift, bins - 1, high_shift, prefix,
                                                   hist_of(), gather ? &kept[at::get_thread_num()] : nullptr);
    });
  } else {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_under_prefix<scalar_t, count_t, true>(data, begin, end, shift, bins - 1, high_shift, prefix,
                                                  hist_of(), gather ? &kept[at::get_thread_num()] : nullptr);
    });
  }
  if (whole) {  // the clamped histogram: every NaN key in the NaN key's bin
    const int64_t nan_bin = static_cast<int64_t>(T::nan_key >> shift);
    for (int64_t r = 0; r < static_cast<int64_t>(threads) * kSubHists; ++r) {
      count_t* row = local.data() + r * bins;
      for (int64_t b = nan_bin + 1; b < bins; ++b) {
        row[nan_bin] += row[b];
        row[b] = 0;
      }
    }
  }
  for (int64_t r = 0; r < static_cast<int64_t>(threads) * kSubHists; ++r) {
    for (int64_t b = 0; b < bins; ++b) out_row[b] += static_cast<int64_t>(local[r * bins + b]);
  }
  if (overflow.load()) span = kNoRange;
  *range_lo = lo;
  *range_span = whole ? span : kNoRange;
  if (!gather || (whole && span == kNoRange)) return c;  // nothing gathered: keep the values
  int64_t total = 0;
  for (const auto& v : kept) total += static_cast<int64_t>(v.size());
  const auto key_dtype = sizeof(bits_t) == 2 ? at::kShort : sizeof(bits_t) == 4 ? at::kInt : at::kLong;
  at::Tensor out = at::empty({total}, c.options().dtype(key_dtype));
  auto* dst = static_cast<bits_t*>(out.data_ptr());
  for (const auto& v : kept) {
    for (const bits_t key : v) *dst++ = key < T::nan_key ? key : T::nan_key;
  }
  return out;
}

// The same pass over keys gathered by an earlier pass (int16/int32/int64 tensors of keys).
template <typename key_t>
at::Tensor histogram_keys(const at::Tensor& src, uint64_t prefix, int shift, int width, bool gather,
                          int64_t* out_row) {
  const at::Tensor c = src.contiguous();
  const key_t* keys = c.data_ptr<key_t>();
  const int64_t n = c.numel();
  const uint64_t digit_mask = (uint64_t(1) << width) - 1;
  const int high_shift = shift + width;
  // branch-free: about half of the gathered keys match (they share the previous digit range),
  // which a branch would mispredict
  std::vector<key_t> kept(gather ? n : 0);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = static_cast<uint64_t>(keys[i]);  // keys are non-negative
    const int64_t match = high_shift >= 64 || (key >> high_shift) == prefix;
    out_row[(key >> shift) & digit_mask] += match;
    if (gather) {
      kept[count] = keys[i];
      count += match;
    }
  }
  if (!gather) return c;
  at::Tensor out = at::empty({count}, c.options());
  std::copy(kept.begin(), kept.begin() + count, out.data_ptr<key_t>());
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>> radix_histogram(
    at::TensorList sources, at::IntArrayRef prefixes, int64_t shift, int64_t width, bool gather,
    at::ArrayRef<double> quantiles) {
  TORCH_CHECK(sources.size() == prefixes.size() && sources.size() == quantiles.size(),
              "radix_histogram: ", sources.size(), " sources but ", prefixes.size(), " prefixes and ",
              quantiles.size(), " quantiles");
  TORCH_CHECK(width >= 1 && width <= dsd_kernels_keys::kMaxDigitBits && shift >= 0,
              "radix_histogram: width must be in [1, ", dsd_kernels_keys::kMaxDigitBits,
              "] and shift >= 0, got width ", width, ", shift ", shift);
  const auto count = static_cast<int64_t>(sources.size());
  at::Tensor hist = at::zeros({count, int64_t(1) << width}, at::kLong);
  std::vector<at::Tensor> next;
  std::vector<int64_t> ranges(2 * count, -1);  // per source: first digit and span gathered, or -1
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& src = sources[i];
    TORCH_CHECK(src.device().is_cpu(), "radix_histogram: sources[", i, "] is not a CPU tensor");
    TORCH_CHECK(prefixes[i] >= 0, "radix_histogram: prefixes[", i, "] must be >= 0");
    const auto prefix = static_cast<uint64_t>(prefixes[i]);
    const int sh = static_cast<int>(shift), wd = static_cast<int>(width);
    int64_t* row = hist.data_ptr<int64_t>() + i * (int64_t(1) << width);
    switch (src.scalar_type()) {
      case at::kShort: next.push_back(histogram_keys<int16_t>(src, prefix, sh, wd, gather, row)); break;
      case at::kInt: next.push_back(histogram_keys<int32_t>(src, prefix, sh, wd, gather, row)); break;
      case at::kLong: next.push_back(histogram_keys<int64_t>(src, prefix, sh, wd, gather, row)); break;
      default:
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "radix_histogram", [&] {
          uint64_t lo = 0, span = kNoRange;
          next.push_back(src.numel() < (int64_t(1) << 32)
                             ? histogram_values<scalar_t, uint32_t>(src, prefix, sh, wd, gather,
                                                                    quantiles[i], row, &lo, &span)
                             : histogram_values<scalar_t, int64_t>(src, prefix, sh, wd, gather,
                                                                   quantiles[i], row, &lo, &span));
          if (span != kNoRange) {
            ranges[2 * i] = static_cast<int64_t>(lo);
            ranges[2 * i + 1] = static_cast<int64_t>(span);
          }
        });
    }
  }
  return {hist, next, ranges};
}

// Packed keep-words from a threshold found elsewhere: key > keys[i] is kept, and of the ties[i]
// elements whose key equals keys[i], all but the first prune_ties[i] in flat order; keys[i] < 0
// keeps everything (nothing to prune).
std::vector<at::Tensor> threshold_masks(at::TensorList tensors, at::IntArrayRef keys,
                                        at::IntArrayRef prune_ties, at::IntArrayRef ties) {
  TORCH_CHECK(tensors.size() == keys.size() && keys.size() == prune_ties.size() &&
                  keys.size() == ties.size(),
              "threshold_masks: tensors, keys, prune_ties and ties must have equal lengths");
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor c = tensors[i].contiguous();
    TORCH_CHECK(c.device().is_cpu(), "threshold_masks: tensors[", i, "] is not a CPU tensor");
    TORCH_CHECK(prune_ties[i] >= 0 && prune_ties[i] <= ties[i], "threshold_masks: prune_ties[", i,
                "] must be in [0, ties[", i, "]]");
    MaskLayout lay(c);
    at::Tensor out = at::empty({lay.rows, lay.words_per_row}, c.options().dtype(at::kInt));
    Selection sel;
    sel.key = static_cast<uint64_t>(std::max<int64_t>(keys[i], 0));
    sel.need = prune_ties[i];
    sel.count_eq = ties[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "threshold_masks", [&] {
      if (lay.num_words() > 0) {
        write_mask<scalar_t>(c.data_ptr<scalar_t>(), lay, sel, keys[i] >= 0, out.data_ptr<int32_t>());
      }
    });
    masks.push_back(out);
  }
  return masks;
}

// ---------------------------------------------------------------- sharded bracket select
// distributed.py's selection in two small round trips and one read of each shard: bracket_pass
// brackets the global k-th key from a sample of the shard (or takes a bracket the ranks agreed
// on); in one pass it counts the keys under the bracket, gathers those inside it (with their
// positions when masks are wanted) and writes every mask word as if the bracket's keys were
// pruned; it also histograms the gathered keys in aligned buckets (key >> shift). The ranks
// all_gather the rows, find the bucket of the k-th key, exchange that bucket's keys for the
// exact key and its ties, and resolve_masks_ sets the kept bits of the gathered keys.

// Per shard, the row's header (then the histogram)
enum BracketRow : int64_t { kRowNumel, kRowLo, kRowHi, kRowShift, kRowBelow, kRowFlag, kRowHeader };

// Keep-bits above hi, bits of keys in [lo, hi] (*inside) and the count of keys under lo
// (added to *under) for the len <= 32 values of one mask word.
template <typename scalar_t>
inline uint32_t classify_word(const scalar_t* src, int64_t len, uint64_t lo, uint64_t hi, uint32_t* inside,
                              int64_t* under) {
  uint32_t above = 0, in = 0;
  int64_t count = 0;
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t key = key_of<scalar_t, true>(src[j]);
    above |= static_cast<uint32_t>(key > hi) << j;
    in |= static_cast<uint32_t>(key - lo <= hi - lo) << j;
    count += key < lo;
  }
  *inside = in;
  *under += count;
  return above;
}


#ifdef DSD_HAVE_AVX512_KERNELS
// classify_word over `count` whole words of contiguous fp32 values (32 per word) at src: writes
// the words, stores the keys in [lo, hi] and their offsets from src (room for 32 * count + 16 of
// each), adds the keys under lo to *under; returns how many keys were stored.
DSD_AVX512 int64_t classify_words_fp32_avx512(const float* src, int64_t count, uint32_t lo, uint32_t hi,
                                              int32_t* words, uint32_t* keys, int32_t* offsets, int64_t* under) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int32_t>(KeyTraits<float>::nan_key));
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i span = _mm512_set1_epi32(static_cast<int32_t>(hi - lo));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t kept = 0, below = 0;
  for (int64_t w = 0; w < count; ++w) {
    uint32_t above = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t at = 32 * w + 16 * h;
      const __m512i key = _mm512_min_epu32(_mm512_and_si512(_mm512_loadu_si512(src + at), abs_mask), nan_key);
      above |= static_cast<uint32_t>(_mm512_cmpgt_epu32_mask(key, top)) << (16 * h);
      below += __builtin_popcount(_mm512_cmplt_epu32_mask(key, low));
      const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(key, low), span);
      // branch-free (about a third of the vectors hold a bracket key, which a branch mispredicts):
      // register compress and a full store (a compress to memory is slow on some CPUs)
      _mm512_storeu_si512(keys + kept, _mm512_maskz_compress_epi32(in, key));
      _mm512_storeu_si512(offsets + kept, _mm512_maskz_compress_epi32(
                                              in, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(at)))));
      kept += __builtin_popcount(in);
    }
    words[w] = static_cast<int32_t>(above);
  }
  *under += below;
  return kept;
}
#endif

// One pass over the mask words: words[w] = keep-bits of key > hi; the keys in [lo, hi] and their
// flat positions gathered per thread (gather_buffers, one per thread); *below the keys under lo. False (stopped early) when a
// thread would gather over max_gather keys.
template <typename scalar_t>
bool classify_pass(const scalar_t* data, const MaskLayout& lay, uint64_t lo, uint64_t hi, int64_t max_gather,
                   int32_t* words, std::vector<std::vector<typename KeyTraits<scalar_t>::bits_t>>* keys,
                   std::vector<std::vector<int64_t>>* positions, int64_t* below, int64_t* in_bracket) {
  const int threads = at::get_num_threads();
  std::vector<int64_t> under(threads, 0);
  std::atomic<bool> overflow{false};
#ifdef DSD_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (lay.cols % 32 == 0 && cpu_has_avx512f()) {  // whole words, contiguous: the vector path
      constexpr int64_t kChunkWords = 128;
      at::parallel_for(0, lay.num_words(), kGrain / 32, [&](int64_t begin, int64_t end) {
        const int tid = at::get_thread_num();
        uint32_t key_buffer[32 * kChunkWords + 16];
        int32_t offset_buffer[32 * kChunkWords + 16];
        auto& k = (*keys)[tid];
        auto& p = (*positions)[tid];
        for (int64_t w0 = begin; w0 < end && !overflow.load(std::memory_order_relaxed); w0 += kChunkWords) {
          const int64_t count = std::min(end, w0 + kChunkWords) - w0;
          const int64_t kept = classify_words_fp32_avx512(data + 32 * w0, count, static_cast<uint32_t>(lo),
                                                          static_cast<uint32_t>(hi), words + w0, key_buffer,
                                                          offset_buffer, &under[tid]);
          k.insert(k.end(), key_buffer, key_buffer + kept);
          const size_t filled = p.size();
          p.resize(filled + static_cast<size_t>(kept));
          for (int64_t j = 0; j < kept; ++j) p[filled + j] = 32 * w0 + offset_buffer[j];
          if (static_cast<int64_t>(k.size()) > max_gather) overflow.store(true, std::memory_order_relaxed);
        }
      });
      if (overflow.load()) return false;
      *below = *in_bracket = 0;
      for (int t = 0; t < threads; ++t) {
        *below += under[t];
        *in_bracket += static_cast<int64_t>((*keys)[t].size());
      }
      return true;
    }
  }
#endif
  parallel_for_words(lay, kGrain / 32, [&](int64_t w, int64_t base, int64_t len) {
    const int tid = at::get_thread_num();
    const scalar_t* src = data + base;
    uint32_t in = 0;
    const uint32_t above = classify_word(src, len, lo, hi, &in, &under[tid]);
    words[w] = static_cast<int32_t>(above);
    if (in != 0) {  // a few percent of the words
      auto& k = (*keys)[tid];
      auto& p = (*positions)[tid];
      for (; in != 0; in &= in - 1) {
        const int j = __builtin_ctz(in);
        k.push_back(key_of<scalar_t, true>(src[j]));
        p.push_back(base + j);
      }
      if (static_cast<int64_t>(k.size()) > max_gather) overflow.store(true, std::memory_order_relaxed);
    }
  });
  if (overflow.load()) return false;
  *below = *in_bracket = 0;
  for (int t = 0; t < threads; ++t) {
    *below += under[t];
    *in_bracket += static_cast<int64_t>((*keys)[t].size());
  }
  return true;
}

struct ShardPass {
  at::Tensor keys, positions, words;
};

template <typename scalar_t>
ShardPass shard_bracket_pass(const at::Tensor& shard, double quantile, int64_t given_lo, int64_t given_hi,
                             int64_t buckets, bool want_masks, int64_t* row) {
  using T = KeyTraits<scalar_t>;
  using bits_t = typename T::bits_t;
  const at::Tensor c = shard.contiguous();
  const scalar_t* data = c.data_ptr<scalar_t>();
  const int64_t n = c.numel();
  const auto key_dtype = sizeof(bits_t) == 2 ? at::kShort : sizeof(bits_t) == 4 ? at::kInt : at::kLong;
  const MaskLayout lay(c);
  ShardPass out{at::empty({0}, c.options().dtype(key_dtype)), at::empty({0}, c.options().dtype(at::kLong)),
                at::empty({want_masks ? lay.rows : 0, want_masks ? lay.words_per_row : 0}, c.options().dtype(at::kInt))};
  row[kRowNumel] = n;
  if (n == 0) return out;
  const bool large = n >= (int64_t(1) << 18);
  uint64_t lo, hi;
  if (given_lo >= 0) {
    lo = static_cast<uint64_t>(given_lo);
    hi = static_cast<uint64_t>(given_hi);
  } else {
    // small shards: up to 4096 keys (all of a shard that small); large ones: as many as the local
    // select samples, in runs of a cache line. The margin, 6 standard deviations of a sampled
    // rank, also covers the other ranks' shards differing from this one by chance (a whole
    // shard's k-th key is not the global one); a miss costs one more pass, not exactness.
    const int64_t samples = large ? std::min<int64_t>(n / 64, int64_t(1) << 16) : std::min<int64_t>(n, 4096);
    const int64_t run = large ? 64 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
    const auto margin = static_cast<int64_t>(3 * std::sqrt(static_cast<double>(samples)));
    const auto b = sample_bracket<scalar_t, true>(data, n, quantile, samples, margin, run);
    lo = b.from_start ? 0 : b.lo;
    hi = b.to_end ? T::nan_key : b.hi;
    int64_t in_sample = 0;
    for (const bits_t key : b.sample) in_sample += static_cast<uint64_t>(key) - lo <= hi - lo;
    if (large && 8 * in_sample > samples) {  // ties: gathering would not pay
      row[kRowFlag] = 1;
      return out;
    }
  }
  int shift = 0;  // buckets of 2^shift keys, aligned, at most `buckets` of them over [lo, hi]
  while ((hi >> shift) - (lo >> shift) >= static_cast<uint64_t>(buckets)) ++shift;
  lo = (lo >> shift) << shift;
  hi = std::min<uint64_t>(((hi >> shift) << shift) + ((uint64_t(1) << shift) - 1), T::nan_key);
  row[kRowLo] = static_cast<int64_t>(lo);
  row[kRowHi] = static_cast<int64_t>(hi);
  row[kRowShift] = shift;

  auto& gathered = gather_buffers<bits_t>(at::get_num_threads());
  auto& positions = gather_buffers<int64_t>(want_masks ? at::get_num_threads() : 0);
  int64_t below = 0, in_bracket = 0;
  // a large shard gathers at most 1/8 of its keys, as the local select; a small one all it must
  const int64_t max_gather = large ? n / (8 * at::get_num_threads()) + 4096 : n;
  const bool ok = want_masks && lay.num_words() > 0
      ? classify_pass(data, lay, lo, hi, max_gather, out.words.data_ptr<int32_t>(), &gathered, &positions, &below,
                      &in_bracket)
      : gather_bracket(data, n, lo, hi, max_gather, &gathered, &below, &in_bracket);
  if (!ok) {
    row[kRowFlag] = 1;
    return out;
  }
  row[kRowBelow] = below;
  int64_t* hist = row + kRowHeader;
  const uint64_t base = lo >> shift;
  out.keys = at::empty({in_bracket}, c.options().dtype(key_dtype));
  auto* dst = static_cast<bits_t*>(out.keys.data_ptr());
  for (const auto& g : gathered) {
    for (const bits_t key : g) hist[(static_cast<uint64_t>(key) >> shift) - base]++;
    dst = std::copy(g.begin(), g.end(), dst);
  }
  if (!positions.empty()) {  // int32 where every position fits
    const bool narrow = n <= std::numeric_limits<int32_t>::max();
    out.positions = at::empty({in_bracket}, c.options().dtype(narrow ? at::kInt : at::kLong));
    if (narrow) {
      int32_t* pos = out.positions.data_ptr<int32_t>();
      for (const auto& p : positions) pos = std::copy(p.begin(), p.end(), pos);
    } else {
      int64_t* pos = out.positions.data_ptr<int64_t>();
      for (const auto& p : positions) pos = std::copy(p.begin(), p.end(), pos);
    }
  }
  return out;
}

// Per shard, an int64 row (numel, lo, hi, shift, below, flag, counts[buckets[i]]), the shard's
// keys in [lo, hi] (clamped; int16/int32/int64 by key width; in no particular order) and, with
// want_masks, their flat positions (int64, in the keys' order) and the mask words with every key
// above hi kept (the bracket's keys and those under it pruned). The bracket is the given
// [lo[i], hi[i]], or where lo[i] < 0 one a sample of the shard puts around the key at
// quantiles[i]; either way widened to whole buckets of 2^shift keys, the fewest that cover it in
// at most buckets[i] (counts[j]: the keys with key >> shift == (lo >> shift) + j; below: the keys
// under lo). flag 1 (and nothing else): a large shard whose sample or pass found over 1/8 of its
// keys in the bracket (ties, or a sample this data misleads). Rows are padded to the largest
// buckets[i].
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> bracket_pass(
    at::TensorList shards, at::ArrayRef<double> quantiles, at::IntArrayRef lo, at::IntArrayRef hi,
    at::IntArrayRef buckets, bool want_masks) {
  const auto count = static_cast<int64_t>(shards.size());
  TORCH_CHECK(static_cast<int64_t>(quantiles.size()) == count && static_cast<int64_t>(lo.size()) == count &&
                  static_cast<int64_t>(hi.size()) == count && static_cast<int64_t>(buckets.size()) == count,
              "bracket_pass: shards, quantiles, lo, hi and buckets must have equal lengths");
  int64_t width = 1;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(buckets[i] >= 1 && buckets[i] <= (int64_t(1) << 16), "bracket_pass: buckets[", i,
                "] must be in [1, 65536]");
    width = std::max(width, buckets[i]);
  }
  at::Tensor rows = at::zeros({count, kRowHeader + width}, at::kLong);
  std::vector<at::Tensor> keys, positions, words;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(shards[i].device().is_cpu(), "bracket_pass: shards[", i, "] is not a CPU tensor");
    TORCH_CHECK(lo[i] < 0 ? quantiles[i] >= 0.0 && quantiles[i] <= 1.0 : lo[i] <= hi[i],
                "bracket_pass: need quantiles[", i, "] in [0, 1] or 0 <= lo[", i, "] <= hi[", i, "]");
    int64_t* row = rows.data_ptr<int64_t>() + i * (kRowHeader + width);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, shards[i].scalar_type(), "bracket_pass", [&] {
      ShardPass pass = shard_bracket_pass<scalar_t>(shards[i], quantiles[i], lo[i], hi[i], buckets[i], want_masks, row);
      keys.push_back(pass.keys);
      positions.push_back(pass.positions);
      words.push_back(pass.words);
    });
  }
  return {rows, keys, positions, words};
}

// The entries (key and position) of the gathered keys inside [lo[i], hi[i]], the threshold's
// bucket: the keys a rank sends to the others and the only ones whose bits wait for the exact key.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> bucket_entries(at::TensorList keys, at::TensorList positions,
                                                                            at::IntArrayRef lo, at::IntArrayRef hi) {
  TORCH_CHECK(keys.size() == positions.size() && keys.size() == lo.size() && keys.size() == hi.size(),
              "bucket_entries: keys, positions, lo and hi must have equal lengths");
  std::vector<at::Tensor> out_keys, out_positions;
  for (size_t i = 0; i < keys.size(); ++i) {
    const at::Tensor k = keys[i].contiguous();
    const at::Tensor p = positions[i].contiguous();
    const bool with_positions = p.numel() > 0;
    TORCH_CHECK(!with_positions || p.numel() == k.numel(), "bucket_entries: positions[", i, "] does not match keys[",
                i, "]");
    const auto low = static_cast<uint64_t>(lo[i]), width = static_cast<uint64_t>(hi[i] - lo[i]);
    std::vector<int64_t> picked;
    AT_DISPATCH_INTEGRAL_TYPES(k.scalar_type(), "bucket_entries", [&] {
      const scalar_t* key = k.data_ptr<scalar_t>();
      for (int64_t j = 0; j < k.numel(); ++j) {
        if (static_cast<uint64_t>(static_cast<int64_t>(key[j])) - low <= width) picked.push_back(j);
      }
      at::Tensor ko = at::empty({static_cast<int64_t>(picked.size())}, k.options().dtype(at::kLong));
      int64_t* dst = ko.data_ptr<int64_t>();
      for (const int64_t j : picked) *dst++ = static_cast<int64_t>(key[j]);
      out_keys.push_back(ko);
    });
    at::Tensor po = at::empty({with_positions ? static_cast<int64_t>(picked.size()) : 0}, p.options().dtype(at::kLong));
    if (with_positions) {
      AT_DISPATCH_INTEGRAL_TYPES(p.scalar_type(), "bucket_entries", [&] {
        const scalar_t* pos = p.data_ptr<scalar_t>();
        int64_t* dst = po.data_ptr<int64_t>();
        for (const int64_t j : picked) *dst++ = static_cast<int64_t>(pos[j]);
      });
    }
    out_positions.push_back(po);
  }
  return {out_keys, out_positions};
}

// resolve_masks_ for one tensor, keys and positions of the given integer types
template <typename key_t, typename pos_t>
void resolve_one(const MaskLayout& lay, uint32_t* out, const key_t* key, const pos_t* pos, int64_t count,
                 int64_t threshold, int64_t prune_ties, size_t index) {
  const int64_t n = lay.rows * lay.cols;
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(static_cast<uint64_t>(pos[j]) < static_cast<uint64_t>(n), "resolve_masks_: positions[", index,
                "] out of range");
  }
  const bool whole_words = lay.cols % 32 == 0;  // flat position / 32 is then the word
  auto keep = [&](int64_t flat) {
    const int64_t row = flat / lay.cols, col = flat - row * lay.cols;
    out[row * lay.words_per_row + col / 32] |= uint32_t(1) << (col % 32);
  };
  std::vector<int64_t> tied;
  for (int64_t j = 0; j < count; ++j) {
    const auto v = static_cast<int64_t>(key[j]);
    const auto flat = static_cast<int64_t>(pos[j]);
    if (v == threshold) tied.push_back(flat);  // rare: predictable
    if (whole_words) {  // branch-free: about half of the gathered keys are above the threshold
      out[flat >> 5] |= static_cast<uint32_t>(v > threshold) << (flat & 31);
    } else if (v > threshold) {
      keep(flat);
    }
  }
  std::sort(tied.begin(), tied.end());  // ties are pruned lowest flat index first
  for (auto j = static_cast<size_t>(std::min<int64_t>(prune_ties, static_cast<int64_t>(tied.size())));
       j < tied.size(); ++j) {
    keep(tied[j]);
  }
}

// Sets, in the words bracket_pass wrote, the kept bits among the gathered keys once the exact
// threshold key thresholds[i] is known: key > threshold, and of the keys equal to it all but the
// first prune_ties[i] in flat order.
void resolve_masks_(at::TensorList tensors, at::TensorList words, at::TensorList keys, at::TensorList positions,
                    at::IntArrayRef thresholds, at::IntArrayRef prune_ties) {
  const size_t count = tensors.size();
  TORCH_CHECK(words.size() == count && keys.size() == count && positions.size() == count &&
                  thresholds.size() == count && prune_ties.size() == count,
              "resolve_masks_: every argument must have one entry per tensor");
  for (size_t i = 0; i < count; ++i) {
    const MaskLayout lay(tensors[i]);
    TORCH_CHECK(words[i].is_contiguous() && words[i].scalar_type() == at::kInt && words[i].numel() == lay.num_words(),
                "resolve_masks_: words[", i, "] is not tensors[", i, "]'s packed mask");
    TORCH_CHECK(positions[i].numel() == keys[i].numel() && thresholds[i] >= 0 && prune_ties[i] >= 0,
                "resolve_masks_: bad entry ", i);
    const at::Tensor k = keys[i].contiguous();
    const at::Tensor p = positions[i].contiguous();
    uint32_t* out = reinterpret_cast<uint32_t*>(words[i].data_ptr<int32_t>());
    auto with_positions = [&](const auto* key) {
      if (p.scalar_type() == at::kInt) {
        resolve_one(lay, out, key, p.data_ptr<int32_t>(), k.numel(), thresholds[i], prune_ties[i], i);
      } else {
        TORCH_CHECK(p.scalar_type() == at::kLong, "resolve_masks_: positions[", i, "] must be int32 or int64");
        resolve_one(lay, out, key, p.data_ptr<int64_t>(), k.numel(), thresholds[i], prune_ties[i], i);
      }
    };
    switch (k.scalar_type()) {
      case at::kShort: with_positions(k.data_ptr<int16_t>()); break;
      case at::kInt: with_positions(k.data_ptr<int32_t>()); break;
      case at::kLong: with_positions(k.data_ptr<int64_t>()); break;
      default: TORCH_CHECK(false, "resolve_masks_: keys[", i, "] must be int16, int32 or int64 keys");
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("magnitude_select", &magnitude_select);
  m.impl("radix_histogram", &radix_histogram);
  m.impl("threshold_masks", &threshold_masks);
  m.impl("bracket_pass", &bracket_pass);
  m.impl("bucket_entries", &bucket_entries);
  m.impl("resolve_masks_", &resolve_masks_);
}

}  // namespace dsd_kernels_cpu
