// Fused masked AdamW on CPU: one pass over memory per tensor (read p, g, m, v [, vmax] and the
// mask words; write p, m, v [, vmax]), torch.optim.AdamW's arithmetic in float (double for
// fp64), pruned entries of the weight and of every moment written as exactly +0 (the pruned
// gradient is never used). Work is split into 32-element mask words, in parallel.
//
// The arithmetic is that of torch's single-tensor and foreach AdamW on CPU (the same bits there),
// operation for operation: param.mul_(1 - lr*wd); exp_avg.lerp_(grad, 1 - beta1), which torch
// computes as one fused multiply-add, fma(w, g - m, m) (w < 0.5; else fma(-(g - m), 1 - w, g));
// exp_avg_sq.mul_(beta2) rounded, then addcmul_(grad, grad, 1 - beta2) as fma((1 - beta2) * g,
// g, v); denom = sqrt(v) / sqrt(bias_correction2) + eps (sqrt as torch computes it: see
// torch_sqrt); param.addcdiv_(exp_avg, denom,
// -step_size) as p + (-step_size * m) / denom. Scalars are rounded to the tensor's float type as
// torch's kernels round them. The step count and bias corrections come from Python (ops.py),
// computed as torch computes them. Hardware FMA is used where the CPU has it (a clone of the word
// loop compiled for it); elsewhere std::fma gives the same bits, slowly. For fp32 tensors whose
// rows are whole mask words, AVX-512 versions of both arithmetics (chosen at run time) read the
// mask words as vector masks instead of expanding them into lane buffers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../masked_adamw_args.h"
#include "common.h"

namespace dsd_kernels_cpu {
namespace {

// A clone for x86-64-v3 (AVX2 + FMA: hardware fused multiply-adds and 8-lane integer selects)
// picked at load time where the CPU has it; elsewhere the default build, std::fma in software.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__)
#define DSD_ADAMW_FMA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSD_ADAMW_FMA_CLONES
#endif

template <typename acc_t>
struct Coefficients {
  acc_t decay;         // 1 - lr * weight_decay
  acc_t avg_weight;    // 1 - beta1, lerp's weight
  acc_t avg_keep;      // 1 - avg_weight, the other lerp branch
  acc_t beta2;
  acc_t sq_weight;     // 1 - beta2
  acc_t neg_step;      // -lr / bias_correction1
  acc_t bc2_sqrt;      // sqrt(bias_correction2)
  acc_t eps;
};

// sqrt as torch computes it on CPU: where torch is built with MKL (x86 wheels), its float sqrt is
// MKL's vector sqrt in high-accuracy mode (ATen/cpu/vml.h), which is not always correctly
// rounded, so the kernel calls the same routine (exported by libtorch_cpu); elsewhere torch's
// sqrt is the correctly rounded instruction, which std::sqrt gives. Weak: the extension loads
// without MKL.
extern "C" {
__attribute__((weak)) void vmsSqrt_64(int64_t n, const float* a, float* r, int64_t mode);
__attribute__((weak)) void vmdSqrt_64(int64_t n, const double* a, double* r, int64_t mode);
}
constexpr int64_t kVmlHighAccuracy = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE

inline void torch_sqrt(const float* in, float* out, int64_t n) {
  if (vmsSqrt_64 != nullptr) {
    vmsSqrt_64(n, in, out, kVmlHighAccuracy);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = std::sqrt(in[j]);
  }
}
inline void torch_sqrt(const double* in, double* out, int64_t n) {
  if (vmdSqrt_64 != nullptr) {
    vmdSqrt_64(n, in, out, kVmlHighAccuracy);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = std::sqrt(in[j]);
  }
}

// Words per block: the block's second moments go through one sqrt call.
constexpr int64_t kBlockWords = 256;
// elements of one block buffer, padded so the buffers do not start a multiple of 4 KiB apart
// (loads of one would falsely wait on stores to another: 4K aliasing)
constexpr int64_t kSpan = kBlockWords * 32 + 48;

// The lanes of `count` mask words from word `first` (all ones without words), and the range of
// elements they cover: (first element, elements). Words cover each row's columns in order and rows
// follow each other, so the range is contiguous.
template <typename bits_t>
std::pair<int64_t, int64_t> block_lanes(const int32_t* words, const MaskLayout& lay, int64_t first,
                                        int64_t count, bits_t* __restrict lanes) {
  int64_t row = first / lay.words_per_row, in_row = first - row * lay.words_per_row;
  const int64_t start = row * lay.cols + in_row * 32;
  int64_t n = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t len = std::min<int64_t>(32, lay.cols - in_row * 32);
    const uint32_t bits = words ? static_cast<uint32_t>(words[first + k]) : 0xFFFFFFFFu;
    expand_word(bits, lanes + n);  // writes 32 lanes; the buffer has room past n + len
    n += len;
    if (++in_row == lay.words_per_row) in_row = 0;
  }
  return {start, n};
}

// One block of up to kBlockWords consecutive mask words starting at word `first`: their
// elements are one contiguous range of the tensor (words cover each row's columns in order, rows
// follow each other), so both phases are single loops over it. Phase 1: the decayed weight, new
// exp_avg, exp_avg_sq (and max) into block buffers; one sqrt call over the block (as torch
// computes sqrt); phase 2: the weight's update, every tensor stored AND-ed with its lane's bits
// (a pruned entry becomes exactly +0 whatever was computed there, NaN and inf included). The
// unit compiled twice (x86-64-v3 and default).
template <typename scalar_t, typename acc_t, bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
DSD_ADAMW_FMA_CLONES void step_block(scalar_t* __restrict p, const scalar_t* __restrict g, scalar_t* __restrict m,
                                     scalar_t* __restrict v, scalar_t* __restrict vmax, const int32_t* words,
                                     const MaskLayout& lay, const Coefficients<acc_t>& coef, int64_t first,
                                     int64_t count, acc_t* __restrict buffers,
                                     typename KeyTraits<scalar_t>::bits_t* __restrict lanes) {
  acc_t* __restrict xd = buffers;
  acc_t* __restrict a = buffers + kSpan;
  acc_t* __restrict s = buffers + 2 * kSpan;
  acc_t* __restrict second = buffers + 3 * kSpan;
  acc_t* __restrict root = buffers + 4 * kSpan;
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const Coefficients<acc_t> c = coef;
  const auto [start, n] = block_lanes(words, lay, first, count, lanes);
  p += start, g += start, m += start, v += start;
  if (kAmsgrad) vmax += start;
  for (int64_t j = 0; j < n; ++j) {
    acc_t grad = static_cast<acc_t>(g[j]);
    if (kMaximize) grad = -grad;
    // param.mul_(1 - lr*wd) is rounded before the update is added: through the buffer, a
    // multiply and an add the compiler cannot fuse
    xd[j] = kDecay ? static_cast<acc_t>(p[j]) * c.decay : static_cast<acc_t>(p[j]);
    const acc_t avg = static_cast<acc_t>(m[j]);
    const acc_t diff = grad - avg;
    a[j] = kSmallWeight ? std::fma(c.avg_weight, diff, avg) : std::fma(-diff, c.avg_keep, grad);
    const acc_t sq = std::fma(c.sq_weight * grad, grad, static_cast<acc_t>(v[j]) * c.beta2);
    s[j] = sq;
    if (kAmsgrad) {
      const acc_t old = static_cast<acc_t>(vmax[j]);
      second[j] = (old > sq || old != old) ? old : sq;  // torch.maximum: NaN wins
    }
  }
  torch_sqrt(kAmsgrad ? second : s, root, n);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t denom = root[j] / c.bc2_sqrt + c.eps;
    const scalar_t new_p = static_cast<scalar_t>(xd[j] + (c.neg_step * a[j]) / denom);
    const bits_t lane = lanes[j];
    p[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, new_p) & lane);
    m[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, static_cast<scalar_t>(a[j])) & lane);
    v[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, static_cast<scalar_t>(s[j])) & lane);
    if (kAmsgrad) {
      vmax[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, static_cast<scalar_t>(second[j])) & lane);
    }
  }
}

#ifdef DSD_HAVE_AVX512_KERNELS
// The coefficients broadcast to 16 lanes
struct Lanes16 {
  __m512 decay, avg_weight, avg_keep, beta2, sq_weight, neg_step, bc2_sqrt, eps;
};
DSD_AVX512 inline Lanes16 broadcast(const Coefficients<float>& c) {
  return {_mm512_set1_ps(c.decay),     _mm512_set1_ps(c.avg_weight), _mm512_set1_ps(c.avg_keep),
          _mm512_set1_ps(c.beta2),     _mm512_set1_ps(c.sq_weight),  _mm512_set1_ps(c.neg_step),
          _mm512_set1_ps(c.bc2_sqrt),  _mm512_set1_ps(c.eps)};
}

// param.mul_(1 - lr*wd) and exp_avg.lerp_(grad, 1 - beta1) for 16 elements, as step_block and
// fused_range compute them (fma(-diff, avg_keep, grad) is fnmadd(diff, avg_keep, grad): negation
// is exact)
template <bool kDecay, bool kSmallWeight>
DSD_AVX512 inline void decayed_weight_and_avg(const float* p, const float* m, __m512 grad, const Lanes16& c,
                                              __m512& param, __m512& avg_out) {
  param = _mm512_loadu_ps(p);
  if (kDecay) param = _mm512_mul_ps(param, c.decay);
  const __m512 avg = _mm512_loadu_ps(m);
  const __m512 diff = _mm512_sub_ps(grad, avg);
  avg_out = kSmallWeight ? _mm512_fmadd_ps(c.avg_weight, diff, avg) : _mm512_fnmadd_ps(diff, c.avg_keep, grad);
}

// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2) for 16 elements
DSD_AVX512 inline __m512 new_exp_avg_sq(const float* v, __m512 grad, const Lanes16& c) {
  return _mm512_fmadd_ps(_mm512_mul_ps(c.sq_weight, grad), grad, _mm512_mul_ps(_mm512_loadu_ps(v), c.beta2));
}

// torch.maximum(old, sq): NaN wins
DSD_AVX512 inline __m512 torch_maximum(__m512 old, __m512 sq) {
  const __mmask16 take_old = _mm512_cmp_ps_mask(old, sq, _CMP_GT_OQ) | _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take_old, sq, old);
}

// param + (-step_size * exp_avg) / (root / sqrt(bias_correction2) + eps) for 16 elements
DSD_AVX512 inline __m512 updated_weight(__m512 param, __m512 a, __m512 root, const Lanes16& c) {
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(root, c.bc2_sqrt), c.eps);
  return _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(c.neg_step, a), denom));
}

// step_block for fp32 in AVX-512, for tensors whose rows are whole mask words (cols % 32 == 0:
// element e of the block is bit e % 32 of word e / 32; words: the block's first word, or
// nullptr: dense), 16 elements a step with half a word as the vector mask. Phase 1 keeps only
// what the sqrt call needs (exp_avg_sq, and the amsgrad maximum); phase 2 recomputes the
// decayed weight and exp_avg from p, g, m (the block is still in cache) rather than reading them
// back from buffers. The operations are step_block's, one for one: the same bits.
template <bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
DSD_AVX512 void step_words_avx512(
    float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
    float* __restrict vmax, const int32_t* words, int64_t n, const Coefficients<float>& c,
    float* __restrict buffers) {
  float* __restrict s = buffers + 2 * kSpan;
  float* __restrict second = buffers + 3 * kSpan;
  float* __restrict root = buffers + 4 * kSpan;
  const Lanes16 c16 = broadcast(c);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 sq = new_exp_avg_sq(v + j, load_negated_if<kMaximize>(g + j), c16);
    _mm512_storeu_ps(s + j, sq);
    if (kAmsgrad) _mm512_storeu_ps(second + j, torch_maximum(_mm512_loadu_ps(vmax + j), sq));
  }
  torch_sqrt(kAmsgrad ? second : s, root, n);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 keep = keep_bits16(words, j);
    __m512 param, a;
    decayed_weight_and_avg<kDecay, kSmallWeight>(p + j, m + j, load_negated_if<kMaximize>(g + j), c16, param, a);
    _mm512_storeu_ps(p + j, _mm512_maskz_mov_ps(keep, updated_weight(param, a, _mm512_loadu_ps(root + j), c16)));
    _mm512_storeu_ps(m + j, _mm512_maskz_mov_ps(keep, a));
    _mm512_storeu_ps(v + j, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(s + j)));
    if (kAmsgrad) _mm512_storeu_ps(vmax + j, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(second + j)));
  }
}
#endif

// The portable whole-word kernels (isa/masked_adamw_kernel.h) run for fp32 tensors whose rows are
// whole mask words on AVX2 + FMA (AVX-512 has its own loops above; the x86 default build has no
// FMA and would round twice). The range [start, start + n) of the tensor, words from word first.
inline bool portable_whole_words(const MaskLayout& lay) {
  return lay.cols % 32 == 0 && cpu_capability() == CpuCapability::kAvx2;
}

inline isa::AdamwSpan adamw_span(float* p, const float* g, float* m, float* v, float* vmax, const int32_t* words,
                                 int64_t first, int64_t n, const Coefficients<float>& c, bool decay, bool maximize,
                                 bool small_weight) {
  const int64_t start = first * 32;
  return {p + start, g + start, m + start, v + start, vmax ? vmax + start : nullptr, words ? words + first : nullptr,
          n, c.decay, c.avg_weight, c.avg_keep, c.beta2, c.sq_weight, c.neg_step, c.bc2_sqrt, c.eps,
          decay, maximize, small_weight};
}

template <typename scalar_t, typename acc_t, bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
void step_tensor(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
                 const int32_t* words, const MaskLayout& lay, const Coefficients<acc_t>& c) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (portable_whole_words(lay)) {
      at::parallel_for(0, lay.num_words(), kBlockWords, [&](int64_t begin, int64_t end) {
        float* buffers = thread_scratch<float>(5 * kSpan);
        float* s = buffers + 2 * kSpan;
        float* second = buffers + 3 * kSpan;
        float* root = buffers + 4 * kSpan;
        for (int64_t first = begin; first < end; first += kBlockWords) {
          const int64_t n = std::min<int64_t>(kBlockWords, end - first) * 32;
          const isa::AdamwSpan span = adamw_span(p, g, m, v, vmax, words, first, n, c, kDecay, kMaximize, kSmallWeight);
          isa::AVX2::adamw_second_moments_fp32(span, s, second);
          torch_sqrt(kAmsgrad ? second : s, root, n);
          isa::AVX2::adamw_update_fp32(span, s, second, root);
        }
      });
      return;
    }
  }
#ifdef DSD_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (lay.cols % 32 == 0 && cpu_has_avx512f()) {
      at::parallel_for(0, lay.num_words(), kBlockWords, [&](int64_t begin, int64_t end) {
        float* buffers = thread_scratch<float>(5 * kSpan);
        for (int64_t first = begin; first < end; first += kBlockWords) {
          const int64_t start = first * 32;
          step_words_avx512<kDecay, kMaximize, kAmsgrad, kSmallWeight>(
              p + start, g + start, m + start, v + start, vmax ? vmax + start : nullptr, words ? words + first : nullptr,
              std::min<int64_t>(kBlockWords, end - first) * 32, c, buffers);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, lay.num_words(), kBlockWords, [&](int64_t begin, int64_t end) {
    // the block buffers of this chunk (L2-resident; on the heap, not a worker thread's stack)
    acc_t* buffers = thread_scratch<acc_t>(5 * kSpan);
    auto* lanes = thread_scratch<typename KeyTraits<scalar_t>::bits_t>(kSpan);
    // runs of words that keep something are stepped by blocks; runs that keep nothing (pruned
    // tiles) are only cleared: their gradient is not read, nothing is computed
    for (int64_t first = begin; first < end;) {
      const bool kept = words == nullptr || words[first] != 0;
      int64_t stop = first + 1;
      while (stop < end && stop - first < kBlockWords && (words == nullptr || (words[stop] != 0) == kept)) ++stop;
      if (kept) {
        step_block<scalar_t, acc_t, kDecay, kMaximize, kAmsgrad, kSmallWeight>(
            p, g, m, v, vmax, words, lay, c, first, stop - first, buffers, lanes);
      } else {
        const auto [start, n] = word_range(lay, first, stop - first);
        for (scalar_t* t : {p, m, v, vmax}) {
          if (t != nullptr) clear_pruned(t + start, n);
        }
      }
      first = stop;
    }
  });
}

// ---------------------------------------------------------------- torch's fused kernel's bits
// torch.optim.AdamW(fused=True) on CPU (ATen's fused Adam kernel) rounds as the step above except
// that its square root is the correctly rounded one (not MKL's), and in the last
// numel % vector_lanes elements of a tensor (its scalar loop after the vector one): past the part
// of that loop the compiler vectorised (epilogue_lanes at a time), exp_avg_sq is
// fma(exp_avg_sq, beta2, (1 - beta2) * grad * grad) and the amsgrad maximum is std::max's (NaN in
// the new exp_avg_sq does not win). Those widths are of torch's binary: Python
// passes them and checks them against torch's own step at first use (_adamw_steps.py). The root
// being a plain instruction, this is one loop over the block: read p, g, m, v, write them AND-ed
// with the lanes. The extension builds with -ffp-contract=off (setup.py), so exactly the fmas
// written here fuse.
// kRegion: 0 torch's vector loop, 1 the vectorised part of its scalar loop, 2 the rest
template <typename scalar_t, bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight, int kRegion>
DSD_ADAMW_FMA_CLONES void fused_range(
    scalar_t* __restrict p, const scalar_t* __restrict g, scalar_t* __restrict m, scalar_t* __restrict v,
    scalar_t* __restrict vmax, const typename KeyTraits<scalar_t>::bits_t* __restrict lanes, int64_t n,
    const Coefficients<scalar_t>& coef) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const Coefficients<scalar_t> c = coef;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t grad = g[j];
    if (kMaximize) grad = -grad;
    const scalar_t param = kDecay ? p[j] * c.decay : p[j];
    const scalar_t avg = m[j];
    const scalar_t diff = grad - avg;
    const scalar_t a = kSmallWeight ? std::fma(c.avg_weight, diff, avg) : std::fma(-diff, c.avg_keep, grad);
    const scalar_t weighted = c.sq_weight * grad;
    const scalar_t sq =
        kRegion == 2 ? std::fma(v[j], c.beta2, weighted * grad) : std::fma(weighted, grad, v[j] * c.beta2);
    scalar_t second = sq;
    if (kAmsgrad) {
      const scalar_t old = vmax[j];
      second = kRegion == 2 ? (old < sq ? sq : old) : ((old > sq || old != old) ? old : sq);
    }
    const scalar_t denom = std::sqrt(second) / c.bc2_sqrt + c.eps;
    const scalar_t new_p = param + (c.neg_step * a) / denom;
    const bits_t lane = lanes[j];
    p[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, new_p) & lane);
    m[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, a) & lane);
    v[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, sq) & lane);
    if (kAmsgrad) vmax[j] = __builtin_bit_cast(scalar_t, __builtin_bit_cast(bits_t, second) & lane);
  }
}

#ifdef DSD_HAVE_AVX512_KERNELS
// fused_range's region 0 for fp32 in AVX-512, 16 elements at a time, for tensors whose rows are
// whole mask words (cols % 32 == 0: element e of the range is bit e % 32 of word e / 32). The
// keep bits go straight from the word into a vector mask, where fused_range reads lanes expanded
// into a buffer first; the operations are fused_range's, one for one (the same bits), and a
// masked move writes exactly +0 where pruned, as the AND does. n: a multiple of 16; words: the
// range's first word, or nullptr (dense).
template <bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
DSD_AVX512 void fused_words_avx512(float* __restrict p, const float* __restrict g, float* __restrict m,
                                         float* __restrict v, float* __restrict vmax, const int32_t* words,
                                         int64_t n, const Coefficients<float>& c) {
  const Lanes16 c16 = broadcast(c);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 keep = keep_bits16(words, j);
    const __m512 grad = load_negated_if<kMaximize>(g + j);
    __m512 param, a;
    decayed_weight_and_avg<kDecay, kSmallWeight>(p + j, m + j, grad, c16, param, a);
    const __m512 sq = new_exp_avg_sq(v + j, grad, c16);
    const __m512 second = kAmsgrad ? torch_maximum(_mm512_loadu_ps(vmax + j), sq) : sq;
    // the root is the IEEE instruction here (torch's fused kernel), MKL's in step_words_avx512
    _mm512_storeu_ps(p + j, _mm512_maskz_mov_ps(keep, updated_weight(param, a, _mm512_sqrt_ps(second), c16)));
    _mm512_storeu_ps(m + j, _mm512_maskz_mov_ps(keep, a));
    _mm512_storeu_ps(v + j, _mm512_maskz_mov_ps(keep, sq));
    if (kAmsgrad) _mm512_storeu_ps(vmax + j, _mm512_maskz_mov_ps(keep, second));
  }
}
#endif

// elements [0, vector_end) of the tensor round as torch's vector loop, [vector_end, epilogue_end)
// as the vectorised part of its scalar loop, the rest as that loop's scalar part
template <typename scalar_t, bool kDecay, bool kMaximize, bool kAmsgrad, bool kSmallWeight>
void fused_tensor(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax, const int32_t* words,
                  const MaskLayout& lay, const Coefficients<scalar_t>& c, int64_t vector_end, int64_t epilogue_end) {
  bool whole_words = false;  // AVX-512 for region 0 (fused_words_avx512)
#ifdef DSD_HAVE_AVX512_KERNELS
  whole_words = std::is_same_v<scalar_t, float> && lay.cols % 32 == 0 && cpu_has_avx512f();
#endif
  [[maybe_unused]] const bool portable = std::is_same_v<scalar_t, float> && portable_whole_words(lay);  // AVX2 for region 0
  at::parallel_for(0, lay.num_words(), kBlockWords, [&](int64_t begin, int64_t end) {
    auto* lanes = thread_scratch<typename KeyTraits<scalar_t>::bits_t>(kSpan);
    for (int64_t first = begin; first < end; first += kBlockWords) {
      const int64_t count = std::min<int64_t>(kBlockWords, end - first);
      int64_t done = 0;  // elements of the block already stepped
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (portable) {
          done = std::clamp<int64_t>(vector_end - first * 32, 0, count * 32);
          isa::AVX2::adamw_fused_fp32(adamw_span(p, g, m, v, vmax, words, first, done, c, kDecay, kMaximize,
                                                 kSmallWeight));
          if (done == count * 32) continue;
        }
      }
#ifdef DSD_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (whole_words) {
          const int64_t start = first * 32;
          done = std::clamp<int64_t>(vector_end - start, 0, count * 32) / 16 * 16;
          fused_words_avx512<kDecay, kMaximize, kAmsgrad, kSmallWeight>(
              p + start, g + start, m + start, v + start, vmax ? vmax + start : nullptr, words ? words + first : nullptr,
              done, c);
          if (done == count * 32) continue;
        }
      }
#endif
      const auto [start, n] = block_lanes(words, lay, first, count, lanes);
      const int64_t cut1 = std::clamp<int64_t>(vector_end - start, done, n);
      const int64_t cut2 = std::clamp<int64_t>(epilogue_end - start, cut1, n);
      const auto at = [&](scalar_t* t, int64_t j) { return t ? t + start + j : nullptr; };
#define DSD_REGION(R, FROM, TO)                                                                         \
  fused_range<scalar_t, kDecay, kMaximize, kAmsgrad, kSmallWeight, R>(                                  \
      p + start + FROM, g + start + FROM, m + start + FROM, v + start + FROM, at(vmax, FROM), lanes + FROM, \
      TO - FROM, c)
      DSD_REGION(0, done, cut1);
      DSD_REGION(1, cut1, cut2);
      DSD_REGION(2, cut2, n);
#undef DSD_REGION
    }
  });
}

template <typename scalar_t, typename acc_t>
void step_dispatch(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   at::Tensor* max_exp_avg_sq, const int32_t* words, const Coefficients<acc_t>& c,
                   bool decay, bool maximize, bool small_weight, int64_t vector_lanes, int64_t epilogue_lanes) {
  const MaskLayout lay(param);
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* m = exp_avg.data_ptr<scalar_t>();
  scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
  scalar_t* vm = max_exp_avg_sq ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
  const int64_t numel = param.numel();
  const int64_t vector_end = vector_lanes > 0 ? numel - numel % vector_lanes : 0;
  const int64_t epilogue_end = epilogue_lanes > 0 ? numel - (numel - vector_end) % epilogue_lanes : vector_end;
  // 2^4 instantiations of each loop: the options never change inside a step
#define DSD_STEP(D, X, A, W)                                                                     \
  (vector_lanes > 0 ? fused_tensor<scalar_t, D, X, A, W>(p, g, m, v, vm, words, lay, c, vector_end, epilogue_end) \
                    : step_tensor<scalar_t, acc_t, D, X, A, W>(p, g, m, v, vm, words, lay, c))
#define DSD_W(D, X, A) (small_weight ? DSD_STEP(D, X, A, true) : DSD_STEP(D, X, A, false))
#define DSD_A(D, X) (vm ? DSD_W(D, X, true) : DSD_W(D, X, false))
#define DSD_X(D) (maximize ? DSD_A(D, true) : DSD_A(D, false))
  decay ? DSD_X(true) : DSD_X(false);
#undef DSD_X
#undef DSD_A
#undef DSD_W
#undef DSD_STEP
}

// vector_lanes: 0 for the single-tensor/foreach bits; for the fused kernel's, its vector width in
// elements of the params' dtype (the last numel % vector_lanes elements round as its scalar loop),
// and epilogue_lanes the width at which the compiler vectorised that loop (0: not at all)
void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                const c10::List<std::optional<at::Tensor>>& mask_words, at::ArrayRef<double> step_sizes,
                at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                double eps, double weight_decay, bool amsgrad, bool maximize, int64_t vector_lanes,
                int64_t epilogue_lanes) {
  dsd_kernels_adamw::check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, mask_words,
                                             step_sizes, bias_correction2_sqrts, amsgrad);
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    at::Tensor m = exp_avgs[i], v = exp_avg_sqs[i];
    at::Tensor vmax = amsgrad ? max_exp_avg_sqs[i] : at::Tensor();
    const std::optional<at::Tensor> mw = mask_words.get(i);
    const int32_t* words = mw.has_value() ? mw->data_ptr<int32_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "masked_adamw_", [&] {
      using acc_t = scalar_t;  // fp32 in float, fp64 in double: torch's opmath types
      const acc_t avg_weight = static_cast<acc_t>(1 - beta1);
      const Coefficients<acc_t> c{static_cast<acc_t>(1 - lr * weight_decay), avg_weight,
                                  static_cast<acc_t>(acc_t(1) - avg_weight), static_cast<acc_t>(beta2),
                                  static_cast<acc_t>(1 - beta2), static_cast<acc_t>(-step_sizes[i]),
                                  static_cast<acc_t>(bias_correction2_sqrts[i]), static_cast<acc_t>(eps)};
      step_dispatch<scalar_t, acc_t>(p, grads[i], m, v, amsgrad ? &vmax : nullptr, words, c,
                                     weight_decay != 0, maximize, std::abs(avg_weight) < acc_t(0.5),
                                     vector_lanes, epilogue_lanes);
    });
  }
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   const c10::List<std::optional<at::Tensor>>& mask_words, at::ArrayRef<double> step_sizes,
                   at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize) {
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, mask_words, step_sizes, bias_correction2_sqrts,
             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, 0, 0);
}

void masked_adamw_fused_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         const c10::List<std::optional<at::Tensor>>& mask_words, at::ArrayRef<double> step_sizes,
                         at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                         double eps, double weight_decay, bool amsgrad, bool maximize, int64_t vector_lanes,
                         int64_t epilogue_lanes) {
  TORCH_CHECK(vector_lanes > 0 && epilogue_lanes >= 0 && epilogue_lanes < vector_lanes,
              "masked_adamw_fused_: need vector_lanes > 0 and 0 <= epilogue_lanes < vector_lanes, got ",
              vector_lanes, " and ", epilogue_lanes);
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, mask_words, step_sizes, bias_correction2_sqrts,
             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, vector_lanes, epilogue_lanes);
}

// AdamW's step counts advanced as torch's non-capturable step does (`_foreach_add_(steps, 1)`),
// and per tensor the scalars the step takes from them, as torch computes them in Python:
// lr / (1 - beta1 ** step) and (1 - beta2 ** step) ** 0.5 (pow, as Python's float ** does), or
// with torch's fused CPU kernel's rule, from the count read as float32, with std::sqrt. One call
// for all tensors: a dispatched add per 0-d tensor cost more than a small model's whole step.
// Every count is checked before any is changed.
std::tuple<std::vector<double>, std::vector<double>> advance_adamw_steps(at::TensorList state_steps, double lr,
                                                                         double beta1, double beta2,
                                                                         bool fused_rule) {
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& t = state_steps[i];
    TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "advance_adamw_steps: state_steps[", i, "] must be a one-element float32 or float64 CPU tensor");
  }
  std::vector<double> step_sizes(state_steps.size()), bias_correction2_sqrts(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& t = state_steps[i];
    double step;
    if (t.scalar_type() == at::kFloat) {
      float* count = t.data_ptr<float>();
      *count += 1.0f;
      step = *count;
    } else {
      double* count = t.data_ptr<double>();
      *count += 1.0;
      step = fused_rule ? static_cast<double>(static_cast<float>(*count)) : *count;
    }
    step_sizes[i] = lr / (1 - std::pow(beta1, step));
    const double bias_correction2 = 1 - std::pow(beta2, step);
    bias_correction2_sqrts[i] = fused_rule ? std::sqrt(bias_correction2) : std::pow(bias_correction2, 0.5);
  }
  return {step_sizes, bias_correction2_sqrts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("advance_adamw_steps", &advance_adamw_steps);
  m.impl("masked_adamw_", &masked_adamw_);
  m.impl("masked_adamw_fused_", &masked_adamw_fused_);
}

}  // namespace dsd_kernels_cpu
