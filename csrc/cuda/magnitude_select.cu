// Exact magnitude selection on CUDA: radix select over the float bits, all tensors of a dtype
// in each launch, no host synchronisation between passes.
//
// Per dtype group of the call:
//   per radix pass (fp32: 3, fp16/bf16: 2, fp64: 6; digits from float_keys.h):
//     histogram_kernel: every block counts, in shared memory, the digit of the keys of its
//       4096-element tile whose higher digits equal the tensor's prefix so far, then adds its
//       non-zero bins to the tensor's 2048-bin global histogram (64-bit counts);
//     select_digit_kernel: one block per tensor scans the histogram, picks the digit holding
//       the k-th smallest key, updates (rank, prefix, ties) in device memory, clears the bins.
//   then, when masks are wanted:
//     tie_count_kernel: ties (key == threshold) per 32-word tile, only for tensors where some
//       but not all ties are pruned (lowest flat index first); other tiles return at once;
//     an exclusive cumulative sum of those counts (at::cumsum);
//     mask_kernel: a warp per mask word: keep = key > T, or key == T with tie rank >= the
//       ties still to prune; __ballot_sync gives the word.
// Launches per dtype, whatever the number of tensors: 2 per pass; with masks, the tie count, the
// sum (cumsum and a subtraction) and the mask kernel; plus the fills of the state, histogram and
// threshold buffers and one table copy. fp32 with masks: 10 kernels, 3 fills, 1 copy.
// Bytes: each pass reads every weight once (no candidate buffer), the mask pass reads them once
// more and writes 1 bit per weight; the tie count reads them only where ties are split.
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <map>

#include "common.cuh"

namespace dsd_kernels_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileElems = kThreads * 16;
constexpr int kBins = 1 << dsd_kernels_keys::kMaxDigitBits;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kWordsPerWarp = 4;
constexpr int kTileWords = (kThreads / kWarpSize) * kWordsPerWarp;

// Per-tensor fields of the table (int64 each).
enum Meta { kData, kNumel, kK, kRows, kCols, kWordsPerRow, kMaskOut, kOutIndex, kMetaFields };
// Per-tensor device state between passes.
enum State { kRank, kPrefix, kTies, kStateFields };

template <typename scalar_t>
__global__ void histogram_kernel(const int64_t* __restrict__ meta,
                                 const int64_t* __restrict__ tile_starts, int64_t tensors,
                                 const int64_t* __restrict__ state,
                                 unsigned long long* __restrict__ hist, int shift, int width) {
  __shared__ unsigned int bins[kBins];
  const int64_t block = blockIdx.x;
  const int64_t t = owner_of(tile_starts, tensors, block);
  const int64_t* m = meta + t * kMetaFields;
  const scalar_t* __restrict__ data = reinterpret_cast<const scalar_t*>(m[kData]);
  const int64_t n = m[kNumel];
  const uint64_t prefix = static_cast<uint64_t>(state[t * kStateFields + kPrefix]);
  const int high = shift + width;
  const uint64_t digit_mask = (uint64_t(1) << width) - 1;
  for (int i = threadIdx.x; i < kBins; i += kThreads) bins[i] = 0;
  __syncthreads();
  const int64_t start = (block - tile_starts[t]) * kTileElems;
  const int64_t end = min(n, start + kTileElems);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const uint64_t key = dsd_kernels_keys::magnitude_key(data[i]);
    if ((key >> high) == prefix) atomicAdd(&bins[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  unsigned long long* row = hist + t * kBins;
  for (int i = threadIdx.x; i <= static_cast<int>(digit_mask); i += kThreads) {
    if (bins[i] != 0) atomicAdd(row + i, static_cast<unsigned long long>(bins[i]));
  }
}

// One block per tensor. The last pass also writes the threshold.
template <typename scalar_t>
__global__ void select_digit_kernel(const int64_t* __restrict__ meta, int64_t* __restrict__ state,
                                    unsigned long long* __restrict__ hist, int pass, int width,
                                    bool last, double* __restrict__ thresholds) {
  using BlockScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t t = blockIdx.x;
  const int64_t* m = meta + t * kMetaFields;
  const int64_t k = m[kK];
  if (k == 0) return;  // nothing pruned: no histogram was filled
  int64_t* s = state + t * kStateFields;
  unsigned long long* row = hist + t * kBins;
  const unsigned long long rank = pass == 0 ? k : s[kRank];
  const int bins = 1 << width;
  unsigned long long counts[kBinsPerThread];
  unsigned long long sum = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int bin = threadIdx.x * kBinsPerThread + j;
    counts[j] = bin < bins ? row[bin] : 0;
    sum += counts[j];
  }
  unsigned long long below;
  BlockScan(scan_storage).ExclusiveSum(sum, below);
  if (below < rank && rank <= below + sum) {  // exactly one thread holds the rank-th key
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (below + counts[j] >= rank) {
        const uint64_t prefix = (static_cast<uint64_t>(s[kPrefix]) << width) |
                                static_cast<uint64_t>(threadIdx.x * kBinsPerThread + j);
        s[kRank] = static_cast<int64_t>(rank - below);
        s[kPrefix] = static_cast<int64_t>(prefix);
        s[kTies] = static_cast<int64_t>(counts[j]);
        if (last) {
          thresholds[m[kOutIndex]] = dsd_kernels_keys::key_value<scalar_t>(
              static_cast<typename KeyTraits<scalar_t>::bits_t>(prefix));
        }
        break;
      }
      below += counts[j];
    }
  }
  __syncthreads();  // every thread has read its bins: clear them for the next pass
  for (int bin = threadIdx.x; bin < bins; bin += kThreads) row[bin] = 0;
}

// Whether tensor t prunes some but not all of the elements tied at its threshold.
__device__ __forceinline__ bool splits_ties(const int64_t* m, const int64_t* s) {
  return m[kK] > 0 && s[kRank] < s[kTies];
}

template <typename scalar_t>
__global__ void tie_count_kernel(const int64_t* __restrict__ meta,
                                 const int64_t* __restrict__ word_tile_starts, int64_t tensors,
                                 const int64_t* __restrict__ state, int64_t* __restrict__ tile_ties) {
  __shared__ int warp_ties[kThreads / kWarpSize];
  const int64_t block = blockIdx.x;
  const int64_t t = owner_of(word_tile_starts, tensors, block);
  const int64_t* m = meta + t * kMetaFields;
  const int64_t* s = state + t * kStateFields;
  if (!splits_ties(m, s)) {
    if (threadIdx.x == 0) tile_ties[block] = 0;
    return;
  }
  const scalar_t* __restrict__ data = reinterpret_cast<const scalar_t*>(m[kData]);
  const uint64_t threshold = static_cast<uint64_t>(s[kPrefix]);
  const int64_t cols = m[kCols], words_per_row = m[kWordsPerRow];
  const int64_t words = m[kRows] * words_per_row;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first = (block - word_tile_starts[t]) * kTileWords + warp * kWordsPerWarp;
  int ties = 0;
  for (int i = 0; i < kWordsPerWarp && first + i < words; ++i) {
    const WordSpan span = word_span(first + i, cols, words_per_row);
    const bool tie = lane < span.len &&
                     dsd_kernels_keys::magnitude_key(data[span.base + lane]) == threshold;
    ties += __popc(__ballot_sync(kFullWarp, tie));
  }
  if (lane == 0) warp_ties[warp] = ties;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_ties[w];
    tile_ties[block] = total;
  }
}

template <typename scalar_t>
__global__ void mask_kernel(const int64_t* __restrict__ meta,
                            const int64_t* __restrict__ word_tile_starts, int64_t tensors,
                            const int64_t* __restrict__ state,
                            const int64_t* __restrict__ ties_before_tile) {
  __shared__ int warp_ties[kThreads / kWarpSize];
  const int64_t block = blockIdx.x;
  const int64_t t = owner_of(word_tile_starts, tensors, block);
  const int64_t* m = meta + t * kMetaFields;
  const int64_t* s = state + t * kStateFields;
  const scalar_t* __restrict__ data = reinterpret_cast<const scalar_t*>(m[kData]);
  int32_t* __restrict__ out = reinterpret_cast<int32_t*>(m[kMaskOut]);
  const bool prune = m[kK] > 0, split = splits_ties(m, s);
  const uint64_t threshold = prune ? static_cast<uint64_t>(s[kPrefix]) : 0;
  const int64_t cols = m[kCols], words_per_row = m[kWordsPerRow];
  const int64_t words = m[kRows] * words_per_row;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t first = (block - word_tile_starts[t]) * kTileWords + warp * kWordsPerWarp;
  unsigned above[kWordsPerWarp], tied[kWordsPerWarp];
  int ties = 0;
#pragma unroll
  for (int i = 0; i < kWordsPerWarp; ++i) {
    above[i] = tied[i] = 0;
    if (first + i < words) {  // warp-uniform
      const WordSpan span = word_span(first + i, cols, words_per_row);
      const bool valid = lane < span.len;
      const uint64_t key = valid ? dsd_kernels_keys::magnitude_key(data[span.base + lane]) : 0;
      above[i] = __ballot_sync(kFullWarp, valid && (!prune || key > threshold));
      tied[i] = __ballot_sync(kFullWarp, valid && prune && key == threshold);
      ties += __popc(tied[i]);
    }
  }
  int64_t before = 0;  // ties of this tensor in earlier words (flat order = word order)
  if (split) {         // block-uniform
    if (lane == 0) warp_ties[warp] = ties;
    __syncthreads();
    before = ties_before_tile[block] - ties_before_tile[word_tile_starts[t]];
    for (int w = 0; w < warp; ++w) before += warp_ties[w];
  }
  const int64_t need = s[kRank];  // ties to prune, lowest flat index first
#pragma unroll
  for (int i = 0; i < kWordsPerWarp; ++i) {
    if (first + i >= words) break;
    unsigned keep = above[i];
    if (split) {
      unsigned kept_ties = tied[i];
      const int ties_here = __popc(tied[i]);
      const int64_t left = need - before;  // ties still to prune when this word starts
      const int prune_here = left <= 0 ? 0 : (left >= ties_here ? ties_here : static_cast<int>(left));
      for (int r = 0; r < prune_here; ++r) kept_ties &= kept_ties - 1;  // drop the lowest tie
      keep |= kept_ties;
      before += ties_here;
    }
    if (lane == 0) out[first + i] = static_cast<int32_t>(keep);
  }
}

template <typename scalar_t>
void select_group(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& out_index,
                  const std::vector<double>& sparsities, bool want_masks, at::Tensor& thresholds,
                  std::vector<at::Tensor>& masks) {
  const int64_t count = static_cast<int64_t>(tensors.size());
  const at::Device device = tensors[0].device();
  std::vector<int64_t> table(count * kMetaFields + 2 * (count + 1));
  int64_t* tile_starts = table.data() + count * kMetaFields;
  int64_t* word_tile_starts = tile_starts + count + 1;
  tile_starts[0] = word_tile_starts[0] = 0;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& c = tensors[i];
    const MaskLayout lay(c);
    const int64_t n = c.numel();
    const int64_t k = static_cast<int64_t>(std::nearbyint(sparsities[i] * static_cast<double>(n)));
    int64_t* m = table.data() + i * kMetaFields;
    m[kData] = reinterpret_cast<int64_t>(c.data_ptr());
    m[kNumel] = n;
    m[kK] = k;
    m[kRows] = lay.rows;
    m[kCols] = lay.cols;
    m[kWordsPerRow] = lay.words_per_row;
    m[kMaskOut] = 0;
    m[kOutIndex] = out_index[i];
    if (want_masks) {
      at::Tensor words = at::empty({lay.rows, lay.words_per_row}, c.options().dtype(at::kInt));
      m[kMaskOut] = reinterpret_cast<int64_t>(words.data_ptr());
      masks[out_index[i]] = words;
    }
    tile_starts[i + 1] = tile_starts[i] + (k > 0 ? ceil_div(n, kTileElems) : 0);
    word_tile_starts[i + 1] = word_tile_starts[i] + ceil_div(lay.num_words(), kTileWords);
  }
  const int64_t tiles = tile_starts[count], word_tiles = word_tile_starts[count];
  if (tiles == 0 && (!want_masks || word_tiles == 0)) return;  // nothing pruned, no masks
  const at::Tensor dev_table = upload_table(table, device);
  const int64_t* d_meta = dev_table.data_ptr<int64_t>();
  const int64_t* d_tile_starts = d_meta + count * kMetaFields;
  const int64_t* d_word_tile_starts = d_tile_starts + count + 1;
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor state = at::zeros({count, kStateFields}, long_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (tiles > 0) {
    at::Tensor hist = at::zeros({count, kBins}, long_opts);
    auto* d_hist = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    constexpr int passes = dsd_kernels_keys::radix_passes<scalar_t>();
    int shift = KeyTraits<scalar_t>::key_bits;
    for (int p = 0; p < passes; ++p) {
      const int width = dsd_kernels_keys::digit_width<scalar_t>(p);
      shift -= width;
      DSD_LAUNCH(tiles, kThreads, stream, histogram_kernel<scalar_t>)(
          d_meta, d_tile_starts, count, state.data_ptr<int64_t>(), d_hist, shift, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      DSD_LAUNCH(count, kThreads, stream, select_digit_kernel<scalar_t>)(
          d_meta, state.data_ptr<int64_t>(), d_hist, p, width, p == passes - 1,
          thresholds.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!want_masks || word_tiles == 0) return;
  at::Tensor tile_ties = at::empty({word_tiles}, long_opts);
  DSD_LAUNCH(word_tiles, kThreads, stream, tie_count_kernel<scalar_t>)(
      d_meta, d_word_tile_starts, count, state.data_ptr<int64_t>(), tile_ties.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ties_before_tile = at::cumsum(tile_ties, 0).sub_(tile_ties);  // exclusive scan
  DSD_LAUNCH(word_tiles, kThreads, stream, mask_kernel<scalar_t>)(
      d_meta, d_word_tile_starts, count, state.data_ptr<int64_t>(),
      ties_before_tile.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, std::vector<at::Tensor>> magnitude_select(
    at::TensorList tensors, at::ArrayRef<double> sparsities, bool want_masks) {
  TORCH_CHECK(tensors.size() == sparsities.size(), "magnitude_select: ", tensors.size(),
              " tensors but ", sparsities.size(), " sparsities");
  TORCH_CHECK(!tensors.empty(), "magnitude_select: tensors is empty");
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  // tensors grouped by dtype: each group is one set of launches
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  std::vector<at::Tensor> contiguous(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "magnitude_select: tensors[", i, "] is on ",
                tensors[i].device(), " but tensors[0] is on ", device);
    TORCH_CHECK(sparsities[i] >= 0.0 && sparsities[i] <= 1.0, "magnitude_select: sparsities[", i,
                "] must be in [0, 1], got ", sparsities[i]);
    contiguous[i] = tensors[i].contiguous();
    groups[tensors[i].scalar_type()].push_back(static_cast<int64_t>(i));
  }
  at::Tensor thresholds = at::full({static_cast<int64_t>(tensors.size())},
                                   -std::numeric_limits<double>::infinity(),
                                   at::TensorOptions().dtype(at::kDouble).device(device));
  std::vector<at::Tensor> masks(want_masks ? tensors.size() : 0);
  for (const auto& [dtype, index] : groups) {
    std::vector<at::Tensor> group;
    std::vector<double> group_sparsities;
    for (const int64_t i : index) {
      group.push_back(contiguous[i]);
      group_sparsities.push_back(sparsities[i]);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "magnitude_select", [&] {
      select_group<scalar_t>(group, index, group_sparsities, want_masks, thresholds, masks);
    });
  }
  return {thresholds, masks};
}

}  // namespace

DSD_CUDA_LIBRARY_IMPL(m) { m.impl("magnitude_select", &magnitude_select); }

}  // namespace dsd_kernels_cuda
