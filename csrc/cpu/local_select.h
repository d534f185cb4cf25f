// The exact k-th smallest magnitude of one tensor on CPU: the selection that the local op
// (magnitude_select.cpp) and mask_update's fused update (mask_update.cpp) run per tensor.
//
// Tensors of 2^15 keys or more first try a bracket select (bracket_select below): one pass that
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
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "selection.h"

namespace dsd_kernels_cpu {
namespace selection {

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
            hist[(key >> shift) & digit_mask] += static_cast<uint64_t>(key >> high_shift) == prefix;
          }
        }
      });
    }
    const int64_t digit = locate(local, threads * kSubHists, bins, &rank, &sel->count_eq);
    prefix = (prefix << width) | static_cast<uint64_t>(digit);
    if (!kClamp && p == 0 && static_cast<uint64_t>(digit) >= static_cast<uint64_t>(T::nan_key - 1) >> shift) {
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

// under this many keys the sample would be most of the tensor: the radix select runs
constexpr int64_t kMinBracketKeys = int64_t(1) << 15;

template <typename scalar_t>
bool bracket_select(const scalar_t* data, int64_t n, int64_t k, Selection* sel) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  if (n < kMinBracketKeys || k < 1) return false;
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

}  // namespace selection
}  // namespace dsd_kernels_cpu
