// Exact N:M masks on CPU: each tensor viewed as (rows, cols) (csrc/mask_layout.h), every M
// consecutive weights of a row keep their N largest |w|. Ranks inside a group by integer keys of
// |w| (csrc/float_keys.h: NaN above +inf, -0.0 == 0.0) with the selection's tie rule (equal keys:
// the lower index is pruned first), so a weight is kept when at least M - N others of its group
// rank below it. One read of the weights and one write of 1 bit per weight, in parallel over
// chunks of whole mask words (a multiple of M columns: groups never straddle two chunks).
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <type_traits>
#include <vector>

#include "../op_args.h"
#include "common.h"

namespace dsd_kernels_cpu {
namespace {

// Bits [0, m) of the result: which of the m weights at `w` are kept.
template <typename scalar_t>
inline uint32_t keep_bits(const scalar_t* w, int64_t n, int64_t m) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  bits_t keys[32];
  for (int64_t j = 0; j < m; ++j) keys[j] = magnitude_key(w[j]);
  uint32_t bits = 0;
  const int64_t pruned = m - n;
  for (int64_t i = 0; i < m; ++i) {
    int64_t below = 0;  // others ranked below i: smaller key, or an equal key at a lower index
    for (int64_t j = 0; j < m; ++j) below += (keys[j] < keys[i]) | ((keys[j] == keys[i]) & (j < i));
    bits |= static_cast<uint32_t>(below >= pruned) << i;
  }
  return bits;
}

// 2:4, the common case, with the comparisons unrolled.
template <typename scalar_t>
inline uint32_t keep_bits_2_4(const scalar_t* w) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const bits_t k0 = magnitude_key(w[0]), k1 = magnitude_key(w[1]), k2 = magnitude_key(w[2]), k3 = magnitude_key(w[3]);
  // below_i = #{j: k_j < k_i or (k_j == k_i and j < i)}; kept when below_i >= 2
  const int b0 = (k1 < k0) + (k2 < k0) + (k3 < k0);
  const int b1 = (k0 <= k1) + (k2 < k1) + (k3 < k1);
  const int b2 = (k0 <= k2) + (k1 <= k2) + (k3 < k2);
  const int b3 = (k0 <= k3) + (k1 <= k3) + (k2 <= k3);
  return static_cast<uint32_t>(b0 >= 2) | (static_cast<uint32_t>(b1 >= 2) << 1) |
         (static_cast<uint32_t>(b2 >= 2) << 2) | (static_cast<uint32_t>(b3 >= 2) << 3);
}

#ifdef DSD_HAVE_AVX512_KERNELS
// 2:4 of fp32 in AVX-512, one 32-bit word (two vectors of 16 weights, four groups each) at a time:
// a group of 4 int32 keys is one 128-bit lane, so the three other members of each element's group
// are its lane rotated by 1, 2 and 3 (shuffle_epi32); rotating by r reaches a lower index in the
// lanes i >= 4 - r, where an equal key also counts as below.
DSD_AVX512 uint32_t keep_16_2_4(const float* w) {
  const __m512i keys = _mm512_min_epi32(_mm512_and_si512(_mm512_loadu_si512(w), _mm512_set1_epi32(0x7FFFFFFF)),
                                        _mm512_set1_epi32(0x7F800001));
  __m512i below = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  // lanes (within each group of 4) whose rotation by r lands on a lower index: i >= 4 - r
  constexpr __mmask16 kLower[4] = {0, 0x8888, 0xCCCC, 0xEEEE};
  const __m512i r1 = _mm512_shuffle_epi32(keys, _MM_PERM_ADCB);  // element i sees key (i + 1) % 4
  const __m512i r2 = _mm512_shuffle_epi32(keys, _MM_PERM_BADC);  // (i + 2) % 4
  const __m512i r3 = _mm512_shuffle_epi32(keys, _MM_PERM_CBAD);  // (i + 3) % 4
  const __m512i rotated[3] = {r1, r2, r3};
  for (int r = 1; r <= 3; ++r) {
    const __mmask16 lt = _mm512_cmplt_epi32_mask(rotated[r - 1], keys);
    const __mmask16 eq = _mm512_cmpeq_epi32_mask(rotated[r - 1], keys) & kLower[r];
    below = _mm512_mask_add_epi32(below, lt | eq, below, one);
  }
  return _mm512_cmpge_epi32_mask(below, _mm512_set1_epi32(2));
}

DSD_AVX512 void words_2_4_avx512(const float* w, int32_t* out, int64_t words) {
  for (int64_t k = 0; k < words; ++k) {
    out[k] = static_cast<int32_t>(keep_16_2_4(w + 32 * k) | (keep_16_2_4(w + 32 * k + 16) << 16));
  }
}
#endif

template <typename scalar_t>
void nm_tensor(const at::Tensor& t, at::Tensor& words, int64_t n, int64_t m) {
  const MaskLayout lay(t);
  const scalar_t* w = t.data_ptr<scalar_t>();
  int32_t* out = words.data_ptr<int32_t>();
  // a chunk: a multiple of lcm(32, m) columns (whole words and whole groups), in every row
  const int64_t unit = std::lcm<int64_t>(32, m);
  const int64_t chunk_cols = unit * std::max<int64_t>(1, 1024 / unit);
  const int64_t chunks_per_row = (lay.cols + chunk_cols - 1) / chunk_cols;
  const bool two_four = n == 2 && m == 4;
  at::parallel_for(0, lay.rows * chunks_per_row, std::max<int64_t>(1, 65536 / chunk_cols), [&](int64_t begin,
                                                                                               int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / chunks_per_row, first = (c % chunks_per_row) * chunk_cols;
      const int64_t last = std::min(lay.cols, first + chunk_cols);
      const scalar_t* src = w + row * lay.cols;
      int32_t* dst = out + row * lay.words_per_row;
      uint64_t pending = 0;  // bits of the word being filled, from column `word_start`
      int64_t word_start = first, filled = 0;
      int64_t g = first;
      if constexpr (std::is_same_v<scalar_t, float>) {
        const int64_t whole = (last - first) / 32;
#ifdef DSD_HAVE_AVX512_KERNELS
        if (two_four && cpu_has_avx512f()) {
          words_2_4_avx512(src + first, dst + first / 32, whole);
          g = word_start = first + 32 * whole;
        }
#endif
        if (two_four && cpu_capability() == CpuCapability::kAvx2) {
          isa::AVX2::words_2_4_fp32(src + first, dst + first / 32, whole);
          g = word_start = first + 32 * whole;
        }
      }
      for (; g < last; g += m) {
        const uint32_t bits = two_four ? keep_bits_2_4(src + g) : keep_bits(src + g, n, m);
        pending |= static_cast<uint64_t>(bits) << filled;
        filled += m;
        while (filled >= 32) {
          dst[word_start / 32] = static_cast<int32_t>(static_cast<uint32_t>(pending));
          pending >>= 32;
          filled -= 32;
          word_start += 32;
        }
      }
      if (filled > 0) dst[word_start / 32] = static_cast<int32_t>(static_cast<uint32_t>(pending));
    }
  });
}

std::vector<at::Tensor> nm_masks(at::TensorList tensors, int64_t n, int64_t m) {
  TORCH_CHECK(1 <= n && n < m && m <= 32, "nm_masks: n=", n, ", m=", m, " is not an N:M pattern (1 <= N < M <= 32)");
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor t = tensors[i].contiguous();
    TORCH_CHECK(t.device().is_cpu() && at::isFloatingType(t.scalar_type()), "nm_masks: tensors[", i,
                "] must be a floating CPU tensor");
    const MaskLayout lay(t);
    TORCH_CHECK(lay.cols % m == 0, "nm_masks: tensors[", i, "] has rows of ", lay.cols,
                " weights, not a multiple of M=", m);
    at::Tensor words = at::zeros({lay.rows, lay.words_per_row}, t.options().dtype(at::kInt));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "nm_masks",
                                    [&] { nm_tensor<scalar_t>(t, words, n, m); });
    out.push_back(words);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) { m.impl("nm_masks", &nm_masks); }

}  // namespace dsd_kernels_cpu
