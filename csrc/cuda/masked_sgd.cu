// Fused multi-tensor masked SGD on CUDA: one launch per dtype for a whole param group.
//
// A block owns 64 consecutive mask words of one tensor (8 warps x 8 words); a warp steps
// through its words with lane j on column 32*w + j, so the loads of p, g and b are coalesced
// and each lane reads its mask bit from the word (a broadcast load). Dense tensors (no mask)
// are laid out as one row, so their words are plain 32-element runs.
// Per element, torch.optim.SGD's arithmetic in opmath (fp32, fp64 for fp64), like torch's
// fused SGD kernel:
//     d = maximize ? -g : g;  d += weight_decay * p
//     b = first ? d : momentum * b + (1 - dampening) * d;  d = nesterov ? d + momentum * b : b
//     p -= lr * d
// and pruned entries get p = b = +0 without reading g (a NaN gradient there changes nothing).
// Launches: 1 kernel and 1 table copy per dtype, whatever the number of tensors.
// Bytes per element: read p, g (+ b), write p (+ b), plus 1/8 B of mask: 20.125 B for fp32
// with momentum.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <map>

#include "../masked_sgd_args.h"
#include "common.cuh"

namespace dsd_kernels_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWordsPerWarp = 8;
constexpr int kTileWords = (kThreads / kWarpSize) * kWordsPerWarp;

enum Meta { kParam, kGrad, kBuffer, kMaskWords, kCols, kWordsPerRow, kWords, kFlags, kMetaFields };
constexpr int64_t kHasMask = 1, kFirstStep = 2;

template <typename opmath_t>
struct Hyper {
  opmath_t lr, momentum, one_minus_dampening, weight_decay;
};

template <typename scalar_t, bool kMomentum, bool kNesterov, bool kMaximize, bool kDecay>
__global__ void masked_sgd_kernel(const int64_t* __restrict__ meta,
                                  const int64_t* __restrict__ tile_starts, int64_t tensors,
                                  Hyper<at::opmath_type<scalar_t>> h) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t block = blockIdx.x;
  const int64_t t = owner_of(tile_starts, tensors, block);
  const int64_t* m = meta + t * kMetaFields;
  scalar_t* __restrict__ p = reinterpret_cast<scalar_t*>(m[kParam]);
  const scalar_t* __restrict__ g = reinterpret_cast<const scalar_t*>(m[kGrad]);
  scalar_t* __restrict__ b = reinterpret_cast<scalar_t*>(m[kBuffer]);
  const int32_t* __restrict__ mask_words = reinterpret_cast<const int32_t*>(m[kMaskWords]);
  const int64_t cols = m[kCols], words_per_row = m[kWordsPerRow], words = m[kWords];
  const bool has_mask = (m[kFlags] & kHasMask) != 0, first = (m[kFlags] & kFirstStep) != 0;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t word0 = (block - tile_starts[t]) * kTileWords + warp * kWordsPerWarp;
  for (int w = 0; w < kWordsPerWarp && word0 + w < words; ++w) {
    const int64_t word = word0 + w;
    const WordSpan span = word_span(word, cols, words_per_row);
    if (lane >= span.len) continue;
    const int64_t i = span.base + lane;
    const bool keep = !has_mask || ((static_cast<uint32_t>(mask_words[word]) >> lane) & 1u);
    if (!keep) {
      p[i] = scalar_t(0);
      if (kMomentum) b[i] = scalar_t(0);
      continue;
    }
    const opmath_t x = static_cast<opmath_t>(p[i]);
    opmath_t d = static_cast<opmath_t>(g[i]);
    if (kMaximize) d = -d;
    if (kDecay) d += h.weight_decay * x;
    if (kMomentum) {
      const opmath_t v =
          first ? d : static_cast<opmath_t>(b[i]) * h.momentum + h.one_minus_dampening * d;
      b[i] = static_cast<scalar_t>(v);
      d = kNesterov ? d + h.momentum * v : v;
    }
    p[i] = static_cast<scalar_t>(x - h.lr * d);
  }
}

template <typename scalar_t>
void step_group(const std::vector<int64_t>& index, at::TensorList params, at::TensorList grads,
                at::TensorList bufs, const c10::List<std::optional<at::Tensor>>& mask_words,
                const c10::List<bool>& first_step, bool use_momentum, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov, bool maximize) {
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
    m[kBuffer] = use_momentum ? reinterpret_cast<int64_t>(bufs[i].data_ptr()) : 0;
    m[kMaskWords] = mw.has_value() ? reinterpret_cast<int64_t>(mw->data_ptr()) : 0;
    const WordGrid grid = word_grid(params[i], mw.has_value());
    m[kCols] = grid.cols;
    m[kWordsPerRow] = grid.words_per_row;
    m[kWords] = grid.words;
    m[kFlags] = (mw.has_value() ? kHasMask : 0) |
                (use_momentum && first_step.get(i) ? kFirstStep : 0);
    tile_starts[j + 1] = tile_starts[j] + ceil_div(m[kWords], kTileWords);
  }
  const int64_t tiles = tile_starts[count];
  if (tiles == 0) return;
  const at::Tensor dev_table = upload_table(table, params[index[0]].device());
  const int64_t* d_meta = dev_table.data_ptr<int64_t>();
  using opmath_t = at::opmath_type<scalar_t>;
  const Hyper<opmath_t> h{static_cast<opmath_t>(lr), static_cast<opmath_t>(momentum),
                          static_cast<opmath_t>(1.0 - dampening), static_cast<opmath_t>(weight_decay)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 2^4 instantiations: the options never change inside a step
#define DSD_STEP(M, N, X, D)                                                      \
  DSD_LAUNCH(tiles, kThreads, stream, masked_sgd_kernel<scalar_t, M, N, X, D>)( \
      d_meta, d_meta + count * kMetaFields, count, h)
#define DSD_DECAY(M, N, X) (weight_decay != 0 ? DSD_STEP(M, N, X, true) : DSD_STEP(M, N, X, false))
#define DSD_MAX(M, N) (maximize ? DSD_DECAY(M, N, true) : DSD_DECAY(M, N, false))
  if (!use_momentum) {
    DSD_MAX(false, false);
  } else if (nesterov) {
    DSD_MAX(true, true);
  } else {
    DSD_MAX(true, false);
  }
#undef DSD_MAX
#undef DSD_DECAY
#undef DSD_STEP
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                 const c10::List<std::optional<at::Tensor>>& mask_words,
                 const c10::List<bool>& first_step, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize) {
  const bool use_momentum = momentum != 0;
  dsd_kernels_sgd::check_masked_sgd_args(params, grads, bufs, mask_words, first_step, use_momentum);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    groups[p.scalar_type()].push_back(static_cast<int64_t>(i));
  }
  for (const auto& [dtype, index] : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "masked_sgd_", [&] {
      step_group<scalar_t>(index, params, grads, bufs, mask_words, first_step, use_momentum, lr,
                           momentum, dampening, weight_decay, nesterov, maximize);
    });
  }
}

}  // namespace

DSD_CUDA_LIBRARY_IMPL(m) { m.impl("masked_sgd_", &masked_sgd_); }

}  // namespace dsd_kernels_cuda
