// The sharded selection's bracket pass, per shard (bracket_pass; dsd_kernels/distributed.py runs
// the collectives around it, sharded_resolve.cpp resolves the masks after them; the radix path:
// sharded_radix.cpp). Shared pieces: selection.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "selection.h"

namespace dsd_kernels_cpu {
namespace {

using namespace selection;

// ---------------------------------------------------------------- sharded bracket select
// distributed.py's selection in one small round trip (two where it must) and one read of each
// shard: bracket_pass brackets the global k-th key from a sample of the shard (or takes a
// bracket the ranks agreed on); in one pass it counts the keys under the bracket, gathers those
// inside it (with their positions when masks are wanted) and writes every mask word as if the
// bracket's keys were pruned; it also histograms the gathered keys in aligned buckets
// (key >> shift) and copies out the keys of a window of buckets around this shard's own
// estimate of the k-th key. The ranks all_gather the rows and find the bucket of the k-th key;
// where every rank's window holds that bucket its keys are at hand, else the ranks exchange
// them; either gives the exact key and its ties, and resolve_masks_ sets the kept bits of the
// gathered keys.

// Per shard, the row's header (then the histogram, then the window's keys)
enum BracketRow : int64_t {
  kRowNumel, kRowLo, kRowHi, kRowShift, kRowBelow, kRowFlag, kRowWindowLo, kRowWindowHi, kRowHeader
};

// int64 slots of a row holding `keys` keys of `key_bytes` bytes each
inline int64_t window_slots(int64_t keys, int64_t key_bytes) { return (keys * key_bytes + 7) / 8; }

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
// classify_word over `count` <= 128 whole words of contiguous fp32 values (32 per word) at src:
// writes the words, stores the keys in [lo, hi] and their offsets from src (room for
// 32 * count + 16 of each), adds the keys under lo to *under; returns how many keys were stored.
// kPacked (for a bracket of under 2^20 keys): each entry of `keys` holds (key - lo) << 12 | offset
// instead, and `offsets` is not written: one compress per vector instead of two.
template <bool kPacked>
DSD_AVX512 int64_t classify_words_fp32_avx512(const float* src, int64_t count, uint32_t lo, uint32_t hi,
                                              int32_t* words, uint32_t* keys, int32_t* offsets, int64_t* under) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int32_t>(KeyTraits<float>::nan_key));
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i span = _mm512_set1_epi32(static_cast<int32_t>(hi - lo));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t kept = 0, above_count = 0;
  for (int64_t w = 0; w < count; ++w) {
    uint32_t above = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t at = 32 * w + 16 * h;
      const __m512i key = _mm512_min_epu32(_mm512_and_si512(_mm512_loadu_si512(src + at), abs_mask), nan_key);
      above |= static_cast<uint32_t>(_mm512_cmpgt_epu32_mask(key, top)) << (16 * h);
      const __m512i from_lo = _mm512_sub_epi32(key, low);
      const __mmask16 in = _mm512_cmple_epu32_mask(from_lo, span);
      const __m512i offset = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(at)));
      // branch-free (about a third of the vectors hold a bracket key, which a branch mispredicts):
      // register compress and a full store (a compress to memory is slow on some CPUs)
      if constexpr (kPacked) {
        _mm512_storeu_si512(keys + kept,
                            _mm512_maskz_compress_epi32(in, _mm512_or_si512(_mm512_slli_epi32(from_lo, 12), offset)));
      } else {
        _mm512_storeu_si512(keys + kept, _mm512_maskz_compress_epi32(in, key));
        _mm512_storeu_si512(offsets + kept, _mm512_maskz_compress_epi32(in, offset));
      }
      kept += __builtin_popcount(in);
    }
    words[w] = static_cast<int32_t>(above);
    above_count += __builtin_popcount(above);
  }
  *under += 32 * count - above_count - kept;  // every key is under, in or above the bracket
  return kept;
}
#endif

// One pass over the mask words: words[w] = keep-bits of key > hi; the keys in [lo, hi] and their
// flat positions gathered per thread (gather_buffers, one per thread); *below the keys under lo.
// False (stopped early) when a thread would gather over max_gather keys.
template <typename scalar_t>
bool classify_pass(const scalar_t* data, const MaskLayout& lay, uint64_t lo, uint64_t hi, int64_t max_gather,
                   int32_t* words, std::vector<std::vector<typename KeyTraits<scalar_t>::bits_t>>* keys,
                   std::vector<std::vector<int64_t>>* positions, int64_t* below, int64_t* in_bracket) {
  const int threads = at::get_num_threads();
  std::vector<int64_t> under(threads, 0);
  std::atomic<bool> overflow{false};
  bool vector_path = false;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // AVX-512 intrinsics, or the AVX2 build of csrc/cpu/isa/compress_kernel.h
    const bool avx2 = cpu_capability() == CpuCapability::kAvx2;
    vector_path = lay.cols % 32 == 0 && (cpu_has_avx512f() || avx2);
    if (vector_path) {  // whole words, contiguous
      constexpr int64_t kChunkWords = 128;  // offsets in a chunk fit the packed entries' 12 bits
      const bool packed = hi - lo < (uint64_t(1) << 20);
      at::parallel_for(0, lay.num_words(), kGrain / 32, [&](int64_t begin, int64_t end) {
        const int tid = at::get_thread_num();
        uint32_t key_buffer[32 * kChunkWords + 16];
        int32_t offset_buffer[32 * kChunkWords + 16];
        auto& k = (*keys)[tid];
        auto& p = (*positions)[tid];
        for (int64_t w0 = begin; w0 < end && !overflow.load(std::memory_order_relaxed); w0 += kChunkWords) {
          const int64_t count = std::min(end, w0 + kChunkWords) - w0;
          const auto lo32 = static_cast<uint32_t>(lo);
          int64_t kept = 0;
          if (avx2) {
            kept = isa::AVX2::classify_words_fp32(data + 32 * w0, count, lo32, static_cast<uint32_t>(hi), packed,
                                                  words + w0, key_buffer, offset_buffer, &under[tid]);
          } else {
#ifdef DSD_HAVE_AVX512_KERNELS
            kept = packed ? classify_words_fp32_avx512<true>(data + 32 * w0, count, lo32, static_cast<uint32_t>(hi),
                                                             words + w0, key_buffer, offset_buffer, &under[tid])
                          : classify_words_fp32_avx512<false>(data + 32 * w0, count, lo32, static_cast<uint32_t>(hi),
                                                              words + w0, key_buffer, offset_buffer, &under[tid]);
#endif
          }
          const size_t key_end = k.size(), position_end = p.size();
          k.resize(key_end + static_cast<size_t>(kept));
          p.resize(position_end + static_cast<size_t>(kept));
          if (packed) {
            for (int64_t j = 0; j < kept; ++j) {
              k[key_end + j] = lo32 + (key_buffer[j] >> 12);
              p[position_end + j] = 32 * w0 + (key_buffer[j] & 4095);
            }
          } else {
            std::copy(key_buffer, key_buffer + kept, k.begin() + static_cast<int64_t>(key_end));
            for (int64_t j = 0; j < kept; ++j) p[position_end + j] = 32 * w0 + offset_buffer[j];
          }
          if (static_cast<int64_t>(k.size()) > max_gather) overflow.store(true, std::memory_order_relaxed);
        }
      });
    }
  }
  if (!vector_path) parallel_for_words(lay, kGrain / 32, [&](int64_t w, int64_t base, int64_t len) {
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

// The window of a shard's row: the buckets around the one holding this shard's own k-th key
// (rank `target` among its keys), as many as hold at most `capacity` keys in all, widened one
// bucket at a time on either side in turn; their keys (in no particular order) go to the row
// after the histogram, padded with -1, and their key range to the header. Where the global k-th
// key lies in every rank's window, the ranks need no second exchange. None (-1) where the
// target's bucket alone holds over `capacity` keys.
template <typename bits_t>
void fill_window(const at::Tensor& keys, double target, int64_t buckets, int64_t capacity, int64_t* row) {
  const int64_t* hist = row + kRowHeader;
  int64_t* slots = row + kRowHeader + buckets;
  std::fill(slots, slots + window_slots(capacity, sizeof(bits_t)), int64_t(-1));  // every key of the padding -1
  auto* window = reinterpret_cast<bits_t*>(slots);
  int64_t centre = 0, through = row[kRowBelow] + hist[0];
  while (centre + 1 < buckets && static_cast<double>(through) < target) through += hist[++centre];
  int64_t first = centre, last = centre, held = hist[centre];
  if (held > capacity) return;
  for (bool widened = true; widened;) {
    widened = false;
    if (last + 1 < buckets && held + hist[last + 1] <= capacity) {
      held += hist[++last];
      widened = true;
    }
    if (first > 0 && held + hist[first - 1] <= capacity) {
      held += hist[--first];
      widened = true;
    }
  }
  const auto shift = static_cast<int>(row[kRowShift]);
  const auto lo = static_cast<uint64_t>(row[kRowLo]);
  const uint64_t from = lo + (static_cast<uint64_t>(first) << shift);
  const uint64_t to = std::min<uint64_t>(lo + (static_cast<uint64_t>(last + 1) << shift) - 1,
                                         static_cast<uint64_t>(row[kRowHi]));
  const auto* key = static_cast<const bits_t*>(keys.data_ptr());
  // branch-free into the calling thread's scratch (one slot past the window for the last write)
  bits_t* picked = thread_scratch<bits_t>(static_cast<size_t>(held) + 1);
  const uint64_t span = to - from;
  int64_t stored = 0;
  for (int64_t j = 0; j < keys.numel() && stored <= held; ++j) {
    picked[stored] = key[j];
    stored += static_cast<uint64_t>(key[j]) - from <= span;
  }
  TORCH_CHECK(stored == held, "bracket_pass: window keys do not match the histogram");
  std::copy(picked, picked + held, window);
  row[kRowWindowLo] = static_cast<int64_t>(from);
  row[kRowWindowHi] = static_cast<int64_t>(to);
}

template <typename scalar_t>
ShardPass shard_bracket_pass(const at::Tensor& shard, double quantile, int64_t given_lo, int64_t given_hi,
                             int64_t buckets, int64_t window_keys, bool want_masks, int64_t* row) {
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
  row[kRowWindowLo] = row[kRowWindowHi] = -1;
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
  if (window_keys > 0) fill_window<bits_t>(out.keys, quantile * static_cast<double>(n), buckets, window_keys, row);
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

// Per shard, an int64 row (numel, lo, hi, shift, below, flag, window_lo, window_hi,
// counts[buckets[i]], then window_keys[i] keys of the shard's key type (int16/int32/int64) in
// whole int64 slots), the shard's keys in [lo, hi] (clamped; key type; in no particular order)
// and, with want_masks, their flat positions (int32 where every position fits, else int64; in
// the keys' order) and the mask words with every key above hi kept (the bracket's keys and
// those under it pruned). The bracket is the given [lo[i], hi[i]], or where lo[i] < 0 one a
// sample of the shard puts around the key at quantiles[i]; either way widened to whole buckets
// of 2^shift keys, the fewest that cover it in at most buckets[i] (counts[j]: the keys with
// key >> shift == (lo >> shift) + j; below: the keys under lo). The window (fill_window): every
// key of the shard in [window_lo, window_hi], whole buckets around the key at quantiles[i] of
// this shard, padded with -1; window_lo = window_hi = -1 where there is none. flag 1 (and no
// window): a large shard whose sample or pass found over 1/8 of its keys in the bracket (ties,
// or a sample this data misleads). Rows are padded to the longest.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> bracket_pass(
    at::TensorList shards, at::ArrayRef<double> quantiles, at::IntArrayRef lo, at::IntArrayRef hi,
    at::IntArrayRef buckets, at::IntArrayRef window_keys, bool want_masks) {
  const auto count = static_cast<int64_t>(shards.size());
  TORCH_CHECK(static_cast<int64_t>(quantiles.size()) == count && static_cast<int64_t>(lo.size()) == count &&
                  static_cast<int64_t>(hi.size()) == count && static_cast<int64_t>(buckets.size()) == count &&
                  static_cast<int64_t>(window_keys.size()) == count,
              "bracket_pass: shards, quantiles, lo, hi, buckets and window_keys must have equal lengths");
  int64_t width = 1;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(buckets[i] >= 1 && buckets[i] <= (int64_t(1) << 16), "bracket_pass: buckets[", i,
                "] must be in [1, 65536]");
    TORCH_CHECK(window_keys[i] >= 0 && window_keys[i] <= (int64_t(1) << 24), "bracket_pass: window_keys[", i,
                "] must be in [0, 2^24]");
    const int64_t key_bytes = static_cast<int64_t>(c10::elementSize(shards[i].scalar_type()));
    width = std::max(width, buckets[i] + window_slots(window_keys[i], key_bytes));
  }
  at::Tensor rows = at::zeros({count, kRowHeader + width}, at::kLong);
  std::vector<at::Tensor> keys, positions, words;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(shards[i].device().is_cpu(), "bracket_pass: shards[", i, "] is not a CPU tensor");
    TORCH_CHECK(lo[i] < 0 ? quantiles[i] >= 0.0 && quantiles[i] <= 1.0 : lo[i] <= hi[i],
                "bracket_pass: need quantiles[", i, "] in [0, 1] or 0 <= lo[", i, "] <= hi[", i, "]");
    int64_t* row = rows.data_ptr<int64_t>() + i * (kRowHeader + width);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, shards[i].scalar_type(), "bracket_pass", [&] {
      ShardPass pass = shard_bracket_pass<scalar_t>(shards[i], quantiles[i], lo[i], hi[i], buckets[i], window_keys[i],
                                                    want_masks, row);
      keys.push_back(pass.keys);
      positions.push_back(pass.positions);
      words.push_back(pass.words);
    });
  }
  return {rows, keys, positions, words};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("bracket_pass", &bracket_pass);
}

}  // namespace dsd_kernels_cpu
