// Shared helpers of the CPU kernels: parallel loops over packed-mask words; the float-bit keys
// and the mask layout are shared with the CUDA kernels (csrc/float_keys.h, csrc/mask_layout.h).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../float_keys.h"
#include "../mask_layout.h"
#include "cpu_capability.h"
#include "isa/isa_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DSD_HAVE_AVX512_KERNELS 1
#define DSD_AVX512 __attribute__((target("avx512f")))
#endif

namespace dsd_kernels_cpu {

using dsd_kernels_keys::key_value;
using dsd_kernels_keys::KeyTraits;
using dsd_kernels_keys::magnitude_key;
using dsd_kernels_layout::MaskLayout;

// A buffer of at least n elements of T owned by the calling thread and kept between calls: a step
// over many small tensors would otherwise allocate (and zero) a block buffer per tensor and chunk,
// which cost more than the arithmetic. One buffer per element type: a caller needing two of the
// same type at once takes one of twice the size.
template <typename T>
T* thread_scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Whether the AVX-512 kernels run: this CPU has AVX-512 and DSD_KERNELS_CPU_CAPABILITY does not
// ask for less (cpu_capability.h). They are compiled for it with a target attribute and chosen at
// run time, so the extension itself stays baseline x86-64.
inline bool cpu_has_avx512f() { return cpu_capability() == CpuCapability::kAvx512; }

// The function `name` of isa_kernels.h compiled for the capability the kernels run.
#define DSD_ISA_KERNEL(name)                                                                \
  (::dsd_kernels_cpu::cpu_capability() == ::dsd_kernels_cpu::CpuCapability::kAvx512         \
       ? &::dsd_kernels_cpu::isa::AVX512::name                                              \
       : ::dsd_kernels_cpu::cpu_capability() == ::dsd_kernels_cpu::CpuCapability::kAvx2     \
             ? &::dsd_kernels_cpu::isa::AVX2::name                                          \
             : &::dsd_kernels_cpu::isa::DEFAULT::name)

// fn(word index, flat offset of its first element, elements in it) for every mask word, in
// parallel: the unit of work of the kernels that read or write packed masks.
template <typename F>
void parallel_for_words(const MaskLayout& lay, int64_t grain, const F& fn) {
  at::parallel_for(0, lay.num_words(), grain, [&](int64_t begin, int64_t end) {
    // one division per chunk, then walk (row, word in row): no per-word division
    int64_t row = begin / lay.words_per_row;
    int64_t in_row = begin - row * lay.words_per_row;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t col0 = in_row * 32;
      fn(w, row * lay.cols + col0, std::min<int64_t>(32, lay.cols - col0));
      if (++in_row == lay.words_per_row) {
        in_row = 0;
        ++row;
      }
    }
  });
}

// fn(i) for every tensor i of a list of `numels`: a tensor of over 1/(2 x threads) of all the
// elements alone, its parallel loops on every thread; the others (a model's layers: alone, one
// of a few 10^5 elements would get one thread of those loops) whole, one per thread, largest
// first from a shared queue, so the threads finish together. Nested in that loop, the kernels'
// own parallel loops run on the calling thread.
template <typename F>
void for_each_tensor(const std::vector<int64_t>& numels, const F& fn) {
  const int threads = at::get_num_threads();
  int64_t total = 0;
  for (const int64_t n : numels) total += n;
  std::vector<int64_t> queued;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] * 2 * threads > total) {
      fn(i);
    } else {
      queued.push_back(static_cast<int64_t>(i));
    }
  }
  std::stable_sort(queued.begin(), queued.end(), [&](int64_t a, int64_t b) { return numels[a] > numels[b]; });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t j = next++; j < queued.size(); j = next++) fn(static_cast<size_t>(queued[j]));
  });
}

// All-ones / all-zeros lanes of a mask word, 8 lanes per byte of the word: expanding a word is
// 4 table reads, and AND-ing values with the lanes vectorises (a per-lane variable shift of
// the word would not on baseline x86-64).
template <typename bits_t>
struct LaneTable {
  bits_t lanes[256][8];
  LaneTable() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int j = 0; j < 8; ++j) lanes[byte][j] = ((byte >> j) & 1) ? static_cast<bits_t>(~bits_t(0)) : bits_t(0);
    }
  }
};

// lanes[j] = all ones where bit j of `bits` is set, else 0, for the 32 lanes of a full word.
template <typename bits_t>
inline void expand_word(uint32_t bits, bits_t* lanes) {
  static const LaneTable<bits_t> table;
  for (int byte = 0; byte < 4; ++byte) {
    std::memcpy(lanes + 8 * byte, table.lanes[(bits >> (8 * byte)) & 0xFF], 8 * sizeof(bits_t));
  }
}

// dst[0, len) = the bits of src AND-ed with lanes (dst may alias src): values where the lane is
// all ones, exactly +0 where it is 0, whatever src held there (NaN included). A fixed len of 32
// (after inlining) vectorises.
template <typename scalar_t, typename bits_t = typename KeyTraits<scalar_t>::bits_t>
inline void and_lanes(const scalar_t* src, scalar_t* dst, const bits_t* lanes, int64_t len) {
  bits_t v[32];
  std::memcpy(v, src, len * sizeof(bits_t));
  for (int64_t j = 0; j < len; ++j) v[j] &= lanes[j];
  std::memcpy(dst, v, len * sizeof(bits_t));
}

// dst[0, len) = src where bit j of the mask word is set, exactly +0 where it is not: branch-free
// (an unstructured mask would mispredict every other branch).
template <typename scalar_t>
inline void mask_word(const scalar_t* src, scalar_t* dst, uint32_t bits, int64_t len) {
  typename KeyTraits<scalar_t>::bits_t lanes[32];
  expand_word(bits, lanes);
  if (len == 32) {
    and_lanes(src, dst, lanes, 32);
  } else {
    and_lanes(src, dst, lanes, len);
  }
}

// x[0, n) becomes exactly +0, for entries under mask words that keep nothing. Rewritten only where
// some bit is set: in the steady state of a pruned block they already are +0, so the optimizers
// read a weight and its state there instead of reading the gradient too and writing them all.
template <typename scalar_t>
inline void clear_pruned(scalar_t* x, int64_t n) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t len = std::min<int64_t>(32, n - c);
    bits_t v[32];
    std::memcpy(v, x + c, len * sizeof(bits_t));
    bits_t any = 0;
    for (int64_t j = 0; j < len; ++j) any |= v[j];
    if (any != 0) std::memset(x + c, 0, len * sizeof(bits_t));
  }
}

// The elements of `count` mask words from word `first`: (first element, elements). Words cover each
// row's columns in order and rows follow each other, so the range is contiguous.
inline std::pair<int64_t, int64_t> word_range(const MaskLayout& lay, int64_t first, int64_t count) {
  const int64_t row = first / lay.words_per_row, in_row = first - row * lay.words_per_row;
  const int64_t last = first + count - 1, last_row = last / lay.words_per_row;
  const int64_t last_col = (last - last_row * lay.words_per_row) * 32;
  const int64_t start = row * lay.cols + in_row * 32;
  return {start, last_row * lay.cols + std::min<int64_t>(last_col + 32, lay.cols) - start};
}

#ifdef DSD_HAVE_AVX512_KERNELS
// AVX-512 loops over one row of mask words (bit j of word w = column 32*w + j), 16 columns a
// step with the word's half as the vector mask; callers check cpu_has_avx512f().

// The keep bits of columns [c, c + 16) of a row of mask words (c a multiple of 16): half of
// word c / 32; all kept without words (a dense tensor)
inline __mmask16 keep_bits16(const int32_t* words, int64_t c) {
  if (words == nullptr) return 0xFFFF;
  const uint32_t word = static_cast<uint32_t>(words[c >> 5]);
  return static_cast<__mmask16>(c & 16 ? word >> 16 : word & 0xFFFFu);
}

// Lanes [0, n) of a 16-lane step (all 16 for n >= 16): the columns left in a row
inline __mmask16 lanes16(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1u); }

// 16 floats, negated when kNegate (a sign flip: exact), e.g. the gradient under maximize
template <bool kNegate>
DSD_AVX512 inline __m512 load_negated_if(const float* src) {
  const __m512 v = _mm512_loadu_ps(src);
  if (!kNegate) return v;
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
}

// dst[0, cols) = src where the row's mask bits are set, exactly +0 elsewhere (dst may be src)
DSD_AVX512 inline void mask_row_avx512(const float* src, float* dst, const int32_t* words, int64_t cols) {
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 limit = lanes16(cols - c);
    const __mmask16 keep = limit & keep_bits16(words, c);
    const __m512 v = _mm512_maskz_loadu_ps(keep, src + c);
    if (limit == 0xFFFF) {
      _mm512_storeu_ps(dst + c, v);  // a whole vector: a plain store, cheaper than a masked one
    } else {
      _mm512_mask_storeu_ps(dst + c, limit, v);
    }
  }
}

// data[0, cols) = exactly +0 where the row's mask bits are clear, untouched where set (in place:
// only the pruned lanes are stored, nothing is loaded)
DSD_AVX512 inline void zero_pruned_row_avx512(float* data, const int32_t* words, int64_t cols) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 limit = lanes16(cols - c);
    const __mmask16 pruned = limit & static_cast<__mmask16>(~keep_bits16(words, c));
    if (pruned) _mm512_mask_storeu_ps(data + c, pruned, zero);
  }
}
#endif

}  // namespace dsd_kernels_cpu
