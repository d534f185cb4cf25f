// Fused masked SGD on CPU: one pass over memory per tensor (read p, g, b and the mask
// words; write p, b), torch.optim.SGD's arithmetic in float (double for fp64), pruned
// entries written as exactly +0. Work is split into 32-element mask words, in parallel.
//
// The arithmetic is torch's, operation for operation, so fp32/fp64 results are bit-identical
// to torch.optim.SGD on CPU (single-tensor, foreach and fused all give the same bits there):
// every `x.add_(y, alpha=a)` of torch is one fused multiply-add, fma(y, a, x), and
// `buf.mul_(momentum)` is rounded before the gradient is added. Hardware FMA is used where the
// CPU has it (a clone of the word loop compiled for it, picked at load time); elsewhere
// std::fma gives the same bits, slowly.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../masked_sgd_args.h"
#include "common.h"
#include "isa/isa_kernels.h"

namespace dsd_kernels_cpu {
namespace {

struct Hyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// The elements [0, n) of one mask word (n = kLen, or len when kLen is 0): computed into local
// arrays, then AND-ed with the word's expanded lanes and stored, so a pruned entry becomes exactly
// +0 whatever was computed there (NaN from a NaN gradient included). With kLen = 32 every loop
// has a fixed trip count and vectorises.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__FMA__)
#define DSD_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define DSD_FMA_CLONES
#endif

template <typename scalar_t, typename acc_t, bool kMomentum, bool kFirst, bool kNesterov,
          bool kMaximize, bool kDecay, int kLen>
DSD_FMA_CLONES void step_word(scalar_t* __restrict p, const scalar_t* __restrict g,
                              scalar_t* __restrict b, uint32_t bits, int64_t len, acc_t lr,
                              acc_t mom, acc_t damp, acc_t wd, acc_t mom_alpha) {
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const int64_t n = kLen > 0 ? kLen : len;
  scalar_t new_p[32], new_b[32];
  // torch rounds every op's result to the tensor's dtype: a no-op in fp32/fp64, where acc_t is
  // the dtype, and one rounding to fp16/bf16 per op for the half types (computed in float)
  const auto round = [](acc_t v) { return static_cast<acc_t>(static_cast<scalar_t>(v)); };
  for (int64_t j = 0; j < n; ++j) {
    acc_t d = static_cast<acc_t>(g[j]);
    const acc_t x = static_cast<acc_t>(p[j]);
    if (kMaximize) d = -d;
    if (kDecay) d = round(std::fma(x, wd, d));  // grad.add(param, alpha=weight_decay)
    if (kMomentum) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const acc_t v = kFirst ? d : round(std::fma(d, damp, round(static_cast<acc_t>(b[j]) * mom)));
      d = kNesterov ? round(std::fma(v, mom_alpha, d)) : v;  // grad.add(buf, alpha=momentum)
      new_b[j] = static_cast<scalar_t>(v);
    }
    new_p[j] = static_cast<scalar_t>(std::fma(d, -lr, x));  // param.add_(grad, alpha=-lr)
  }
  bits_t lanes[32];
  expand_word(bits, lanes);
  and_lanes(new_p, p, lanes, n);
  if (kMomentum) and_lanes(new_b, b, lanes, n);
}

#ifdef DSD_HAVE_AVX512_KERNELS
// step_word for fp32 in AVX-512 over n elements of whole mask words (n a multiple of 32; words:
// their first word, or nullptr: dense), 16 lanes a step with the word's half as the vector mask
// instead of lanes expanded into a buffer: the same operations (the same bits), and a masked move
// writes exactly +0 where pruned, as the AND does.
template <bool kMomentum, bool kFirst, bool kNesterov, bool kMaximize, bool kDecay>
DSD_AVX512 void step_words_avx512(float* __restrict p, const float* __restrict g, float* __restrict b,
                                  const int32_t* words, int64_t n, float lr, float mom, float damp, float wd) {
  const __m512 neg_lr = _mm512_set1_ps(-lr), momentum = _mm512_set1_ps(mom);
  const __m512 dampening = _mm512_set1_ps(damp), decay = _mm512_set1_ps(wd);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 keep = keep_bits16(words, j);
    __m512 d = load_negated_if<kMaximize>(g + j);
    const __m512 x = _mm512_loadu_ps(p + j);
    if (kDecay) d = _mm512_fmadd_ps(x, decay, d);
    if (kMomentum) {
      const __m512 v = kFirst ? d : _mm512_fmadd_ps(d, dampening, _mm512_mul_ps(_mm512_loadu_ps(b + j), momentum));
      d = kNesterov ? _mm512_fmadd_ps(v, momentum, d) : v;
      _mm512_storeu_ps(b + j, _mm512_maskz_mov_ps(keep, v));
    }
    _mm512_storeu_ps(p + j, _mm512_maskz_mov_ps(keep, _mm512_fmadd_ps(d, neg_lr, x)));
  }
}
#endif

// One tensor, with the options as template flags so the inner loops have no branches.
template <typename scalar_t, typename acc_t, bool kMomentum, bool kFirst, bool kNesterov,
          bool kMaximize, bool kDecay>
void step_tensor(scalar_t* __restrict p, const scalar_t* __restrict g, scalar_t* __restrict b,
                 const int32_t* words, const MaskLayout& lay, const Hyper& h) {
  // torch's CPU add(other, alpha) takes alpha in the tensor's dtype (a rounding for fp16/bf16),
  // mul(scalar) the scalar in float
  const auto in_dtype = [](double v) { return static_cast<acc_t>(static_cast<scalar_t>(v)); };
  const acc_t lr = in_dtype(h.lr), mom = h.momentum, damp = in_dtype(1 - h.dampening), wd = in_dtype(h.weight_decay);
  const acc_t mom_alpha = in_dtype(h.momentum);
#ifdef DSD_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (lay.cols % 32 == 0 && cpu_has_avx512f()) {  // rows of whole words: one row of all the words
      at::parallel_for(0, lay.num_words(), 2048, [&](int64_t begin, int64_t end) {
        step_words_avx512<kMomentum, kFirst, kNesterov, kMaximize, kDecay>(
            p + begin * 32, g + begin * 32, kMomentum ? b + begin * 32 : nullptr, words ? words + begin : nullptr,
            (end - begin) * 32, lr, mom, damp, wd);  // fp32: alphas as given
      });
      return;
    }
  }
#endif
  if constexpr (std::is_same_v<scalar_t, float>) {
    // AVX2 + FMA: the portable vector loop (isa/masked_sgd_kernel.h), the same bits
    if (words != nullptr && cpu_capability() == CpuCapability::kAvx2) {
      isa::SgdRow row{p, g, b, words, 0, lr, mom, damp, wd, mom_alpha, kFirst, kNesterov, kMaximize, kDecay};
      if (!kMomentum) row.b = nullptr;
      if (lay.cols % 32 == 0) {  // rows of whole words: one row of all the words
        at::parallel_for(0, lay.num_words(), 2048, [&](int64_t begin, int64_t end) {
          isa::SgdRow part = row;
          part.p += begin * 32, part.g += begin * 32, part.words += begin, part.n = (end - begin) * 32;
          if (part.b) part.b += begin * 32;
          isa::AVX2::masked_sgd_fp32(part);
        });
      } else {
        at::parallel_for(0, lay.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(lay.cols, 1)),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t r = begin; r < end; ++r) {
                             isa::SgdRow part = row;
                             part.p += r * lay.cols, part.g += r * lay.cols, part.words += r * lay.words_per_row;
                             part.n = lay.cols;
                             if (part.b) part.b += r * lay.cols;
                             isa::AVX2::masked_sgd_fp32(part);
                           }
                         });
      }
      return;
    }
  }
  parallel_for_words(lay, 2048, [&](int64_t w, int64_t base, int64_t len) {
    const uint32_t bits = words ? static_cast<uint32_t>(words[w]) : 0xFFFFFFFFu;
    scalar_t* bw = kMomentum ? b + base : nullptr;
    if (bits == 0) {  // nothing kept: the gradient is not read, nothing is computed
      clear_pruned(p + base, len);
      if (kMomentum) clear_pruned(bw, len);
    } else if (len == 32) {
      step_word<scalar_t, acc_t, kMomentum, kFirst, kNesterov, kMaximize, kDecay, 32>(
          p + base, g + base, bw, bits, len, lr, mom, damp, wd, mom_alpha);
    } else {
      step_word<scalar_t, acc_t, kMomentum, kFirst, kNesterov, kMaximize, kDecay, 0>(
          p + base, g + base, bw, bits, len, lr, mom, damp, wd, mom_alpha);
    }
  });
}

template <typename scalar_t, typename acc_t>
void step_dispatch(at::Tensor& param, const at::Tensor& grad, at::Tensor* buf, const int32_t* words,
                   bool first, const Hyper& h) {
  const MaskLayout lay(param);
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* b = buf ? buf->data_ptr<scalar_t>() : nullptr;
  const bool decay = h.weight_decay != 0;
  // 2^5 instantiations of one loop: the options never change inside a step
#define DSD_STEP(M, F, N, X, D) step_tensor<scalar_t, acc_t, M, F, N, X, D>(p, g, b, words, lay, h)
#define DSD_DECAY(M, F, N, X) (decay ? DSD_STEP(M, F, N, X, true) : DSD_STEP(M, F, N, X, false))
#define DSD_MAX(M, F, N) (h.maximize ? DSD_DECAY(M, F, N, true) : DSD_DECAY(M, F, N, false))
  if (buf == nullptr) {
    DSD_MAX(false, false, false);
  } else if (first) {
    h.nesterov ? DSD_MAX(true, true, true) : DSD_MAX(true, true, false);
  } else {
    h.nesterov ? DSD_MAX(true, false, true) : DSD_MAX(true, false, false);
  }
#undef DSD_MAX
#undef DSD_DECAY
#undef DSD_STEP
}

void masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                 const c10::List<std::optional<at::Tensor>>& mask_words,
                 const c10::List<bool>& first_step, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize) {
  const Hyper h{lr, momentum, dampening, weight_decay, nesterov, maximize};
  const bool use_momentum = momentum != 0;
  dsd_kernels_sgd::check_masked_sgd_args(params, grads, bufs, mask_words, first_step, use_momentum);
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    at::Tensor b = use_momentum ? bufs[i] : at::Tensor();
    const std::optional<at::Tensor> mw = mask_words.get(i);
    const int32_t* words = mw.has_value() ? mw->data_ptr<int32_t>() : nullptr;
    const bool first = use_momentum && first_step.get(i);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      step_dispatch<scalar_t, acc_t>(p, grads[i], use_momentum ? &b : nullptr, words, first, h);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) { m.impl("masked_sgd_", &masked_sgd_); }

}  // namespace dsd_kernels_cpu
