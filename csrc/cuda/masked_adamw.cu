// Fused multi-tensor masked AdamW on CUDA: one launch per dtype (fp32, fp64) for a whole param
// group, in the layout of masked_sgd.cu (a block owns 64 consecutive mask words of one tensor, a
// warp steps through 8 of them, lane j on column 32*w + j: coalesced loads, the mask bit from a
// broadcast word load; dense tensors are one row).
//
// Per kept element, torch.optim.AdamW's foreach step as torch's CUDA kernels round it (the
// order the Triton kernel reproduces bit for bit on an H200, see triton/masked_adamw.py), every
// operation an explicitly rounded intrinsic so that nvcc contracts nothing else:
//     g = maximize ? -grad : grad;  x = p * (1 - lr*wd)                 (_foreach_mul_)
//     m = fma(1 - beta1, g - m, m)   (beta1 > 0.5: fma(-(g - m), beta1, g))  (_foreach_lerp_)
//     v = fma(1 - beta2, g * g, v * beta2)                              (_foreach_mul_, addcmul_)
//     vmax = max(vmax, v) (NaN wins);  denom = sqrt(v or vmax) / sqrt(bias_correction2) + eps
//     p = fma(-step_size, m / denom, x)                                 (_foreach_addcdiv_)
// with IEEE square root and division. Pruned elements get p = m = v (= vmax) = +0 without
// reading the gradient. step_size = lr / bias_correction1 and sqrt(bias_correction2) come per
// tensor from the host (torch computes them in Python from each tensor's step count).
// Launches: 1 kernel and 1 table copy per dtype. Bytes per fp32 element: read p, g, m, v, write
// p, m, v, plus 1/8 B of mask: 28.125 B (36.125 B with amsgrad).
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <map>

#include "../masked_adamw_args.h"
#include "common.cuh"

namespace dsd_kernels_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWordsPerWarp = 8;
constexpr int kTileWords = (kThreads / kWarpSize) * kWordsPerWarp;

// per-tensor int64 fields, then the two per-tensor scalars as the bits of doubles
enum Meta {
  kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaskWords, kCols, kWordsPerRow, kWords,
  kHasMask, kNegStepSize, kBiasCorrection2Sqrt, kMetaFields
};

// Rounded once each, never fused with a neighbour (nvcc contracts a * b + c otherwise).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T>
struct Hyper {
  T decay, lerp_weight, lerp_keep, beta2, sq_weight, eps;
};

template <typename T>
__device__ __forceinline__ T table_scalar(const int64_t* m, int field) {
  double value;
  memcpy(&value, m + field, sizeof(double));
  return static_cast<T>(value);
}

template <typename T, bool kAmsgrad, bool kMaximize, bool kDecay, bool kSmallWeight>
__global__ void masked_adamw_kernel(const int64_t* __restrict__ meta,
                                    const int64_t* __restrict__ tile_starts, int64_t tensors,
                                    Hyper<T> h) {
  const int64_t block = blockIdx.x;
  const int64_t t = owner_of(tile_starts, tensors, block);
  const int64_t* m = meta + t * kMetaFields;
  T* __restrict__ p = reinterpret_cast<T*>(m[kParam]);
  const T* __restrict__ grad = reinterpret_cast<const T*>(m[kGrad]);
  T* __restrict__ exp_avg = reinterpret_cast<T*>(m[kExpAvg]);
  T* __restrict__ exp_avg_sq = reinterpret_cast<T*>(m[kExpAvgSq]);
  T* __restrict__ max_exp_avg_sq = reinterpret_cast<T*>(m[kMaxExpAvgSq]);
  const int32_t* __restrict__ mask_words = reinterpret_cast<const int32_t*>(m[kMaskWords]);
  const int64_t cols = m[kCols], words_per_row = m[kWordsPerRow], words = m[kWords];
  const bool has_mask = m[kHasMask] != 0;
  const T neg_step = table_scalar<T>(m, kNegStepSize);
  const T bc2_sqrt = table_scalar<T>(m, kBiasCorrection2Sqrt);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t word0 = (block - tile_starts[t]) * kTileWords + warp * kWordsPerWarp;
  for (int w = 0; w < kWordsPerWarp && word0 + w < words; ++w) {
    const int64_t word = word0 + w;
    const WordSpan span = word_span(word, cols, words_per_row);
    if (lane >= span.len) continue;
    const int64_t i = span.base + lane;
    const bool keep = !has_mask || ((static_cast<uint32_t>(mask_words[word]) >> lane) & 1u);
    if (!keep) {
      p[i] = exp_avg[i] = exp_avg_sq[i] = T(0);
      if (kAmsgrad) max_exp_avg_sq[i] = T(0);
      continue;
    }
    T g = grad[i];
    if (kMaximize) g = -g;
    T x = p[i];
    if (kDecay) x = mul_rn(x, h.decay);
    const T avg0 = exp_avg[i];
    const T diff = sub_rn(g, avg0);
    const T avg = kSmallWeight ? fma_rn(h.lerp_weight, diff, avg0) : fma_rn(-diff, h.lerp_keep, g);
    const T sq = fma_rn(h.sq_weight, mul_rn(g, g), mul_rn(exp_avg_sq[i], h.beta2));
    T second = sq;
    if (kAmsgrad) {
      const T old = max_exp_avg_sq[i];
      second = (old > sq || old != old) ? old : sq;  // torch.maximum: NaN wins
      max_exp_avg_sq[i] = second;
    }
    const T denom = add_rn(div_rn(sqrt_rn(second), bc2_sqrt), h.eps);
    p[i] = fma_rn(neg_step, div_rn(avg, denom), x);
    exp_avg[i] = avg;
    exp_avg_sq[i] = sq;
  }
}

template <typename T>
void step_group(const std::vector<int64_t>& index, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                const c10::List<std::optional<at::Tensor>>& mask_words, at::ArrayRef<double> step_sizes,
                at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                double eps, double weight_decay, bool amsgrad, bool maximize) {
  const int64_t count = static_cast<int64_t>(index.size());
  std::vector<int64_t> table(count * kMetaFields + count + 1);
  int64_t* tile_starts = table.data() + count * kMetaFields;
  tile_starts[0] = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = index[j];
    const std::optional<at::Tensor> mw = mask_words.get(i);
    int64_t* m = table.data() + j * kMetaFields;
    m[kParam] = reinterpret_cast<int64_t>(params[i].data_ptr());
    m[kGrad] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    m[kExpAvg] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
    m[kExpAvgSq] = reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr());
    m[kMaxExpAvgSq] = amsgrad ? reinterpret_cast<int64_t>(max_exp_avg_sqs[i].data_ptr()) : 0;
    m[kMaskWords] = mw.has_value() ? reinterpret_cast<int64_t>(mw->data_ptr()) : 0;
    const WordGrid grid = word_grid(params[i], mw.has_value());
    m[kCols] = grid.cols;
    m[kWordsPerRow] = grid.words_per_row;
    m[kWords] = grid.words;
    m[kHasMask] = mw.has_value() ? 1 : 0;
    const double neg_step = -step_sizes[i], bc2_sqrt = bias_correction2_sqrts[i];
    std::memcpy(m + kNegStepSize, &neg_step, sizeof(double));
    std::memcpy(m + kBiasCorrection2Sqrt, &bc2_sqrt, sizeof(double));
    tile_starts[j + 1] = tile_starts[j] + ceil_div(m[kWords], kTileWords);
  }
  const int64_t tiles = tile_starts[count];
  if (tiles == 0) return;
  const at::Tensor dev_table = upload_table(table, params[index[0]].device());
  const int64_t* d_meta = dev_table.data_ptr<int64_t>();
  // lerp's weight as torch's foreach lerp takes it (a T), and 1 - weight from it, exactly
  const T lerp_weight = static_cast<T>(1.0 - beta1);
  const Hyper<T> h{static_cast<T>(1.0 - lr * weight_decay), lerp_weight, T(1) - lerp_weight,
                   static_cast<T>(beta2), static_cast<T>(1.0 - beta2), static_cast<T>(eps)};
  const bool small_weight = std::abs(static_cast<double>(lerp_weight)) < 0.5;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 2^4 instantiations: the options never change inside a step
#define DSD_STEP(A, X, D, S)                                                          \
  DSD_LAUNCH(tiles, kThreads, stream, masked_adamw_kernel<T, A, X, D, S>)(d_meta, \
      d_meta + count * kMetaFields, count, h)
#define DSD_SMALL(A, X, D) (small_weight ? DSD_STEP(A, X, D, true) : DSD_STEP(A, X, D, false))
#define DSD_DECAY(A, X) (weight_decay != 0 ? DSD_SMALL(A, X, true) : DSD_SMALL(A, X, false))
#define DSD_MAX(A) (maximize ? DSD_DECAY(A, true) : DSD_DECAY(A, false))
  if (amsgrad) {
    DSD_MAX(true);
  } else {
    DSD_MAX(false);
  }
#undef DSD_MAX
#undef DSD_DECAY
#undef DSD_SMALL
#undef DSD_STEP
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   const c10::List<std::optional<at::Tensor>>& mask_words, at::ArrayRef<double> step_sizes,
                   at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool amsgrad, bool maximize) {
  dsd_kernels_adamw::check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, mask_words,
                                             step_sizes, bias_correction2_sqrts, amsgrad);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[params[i].scalar_type()].push_back(static_cast<int64_t>(i));
  for (const auto& [dtype, index] : groups) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "masked_adamw_", [&] {
      step_group<scalar_t>(index, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, mask_words,
                           step_sizes, bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay,
                           amsgrad, maximize);
    });
  }
}

}  // namespace

DSD_CUDA_LIBRARY_IMPL(m) { m.impl("masked_adamw_", &masked_adamw_); }

}  // namespace dsd_kernels_cuda
