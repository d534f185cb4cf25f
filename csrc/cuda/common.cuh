// Shared pieces of the CUDA kernels: per-tensor tables uploaded in one copy, the block ->
// tensor lookup of the multi-tensor launches, and warp-per-mask-word indexing.
//
// Multi-tensor launches: the host writes one int64 table (per-tensor fields, then the
// cumulative tile counts) and uploads it with one asynchronous copy from pinned memory. Block
// b finds its tensor by binary search over the cumulative counts, so one launch covers every
// tensor of a dtype whatever their number and sizes.
//
// Mask words: a warp owns whole 32-element words of the packed-mask layout (DESIGN.md): lane j
// handles column 32*w + j of the word's row, so loads are coalesced and __ballot_sync yields
// a mask word directly.
//
// DSD_CUDA_EMULATION (tests only): the same sources compile as C++ for the CPU, with
// tests/cuda_emulation/emulation.h standing in for the CUDA runtime (a block's threads are
// std::threads, barriers and ballots are real), so the kernels' logic is tested on a machine
// without a GPU. Hence kernel launches go through DSD_LAUNCH and registration through
// DSD_CUDA_LIBRARY_IMPL.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>

#ifndef DSD_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>
// kernel<<<grid, threads, 0, stream>>>(args): DSD_LAUNCH(grid, threads, stream, kernel)(args)
#define DSD_LAUNCH(grid, threads, stream, ...) __VA_ARGS__<<<(grid), (threads), 0, (stream)>>>
#define DSD_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CUDA, m)
#endif

#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "../float_keys.h"
#include "../mask_layout.h"

namespace dsd_kernels_cuda {

using dsd_kernels_keys::KeyTraits;
using dsd_kernels_layout::MaskLayout;

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

#ifndef DSD_CUDA_EMULATION
// Tables uploaded while a CUDA graph captured, with their pinned sources: every replay copies
// from that host block again, so neither may ever be freed or reused (leaked on purpose: no
// CUDA frees at exit).
inline void hold_for_graphs(const at::Tensor& host, const at::Tensor& device_table) {
  static std::mutex lock;
  static auto* held = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> guard(lock);
  held->push_back(host);
  held->push_back(device_table);
}
#endif

// The int64 `values` on `device`: one copy from pinned memory on the current stream; the
// caching host allocator keeps the pinned block alive until the copy has run (under graph
// capture, for the process's life: hold_for_graphs).
inline at::Tensor upload_table(const std::vector<int64_t>& values, const at::Device& device) {
#ifdef DSD_CUDA_EMULATION  // CPU tensors: a plain copy
  return at::tensor(at::ArrayRef<int64_t>(values), at::TensorOptions().dtype(at::kLong).device(device));
#else
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t));
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    hold_for_graphs(host, table);
  }
  return table;
#endif
}

// The tensor that owns block `block`: the largest t with starts[t] <= block, where starts holds
// the cumulative tile counts of the `count` tensors (tensors with no tiles are skipped).
__device__ __forceinline__ int64_t owner_of(const int64_t* __restrict__ starts, int64_t count,
                                            int64_t block) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Where mask word `word` lies: its first element (flat offset) and its number of elements.
struct WordSpan {
  int64_t base;
  int len;
};
__device__ __forceinline__ WordSpan word_span(int64_t word, int64_t cols, int64_t words_per_row) {
  const int64_t row = word / words_per_row;
  const int64_t col0 = (word - row * words_per_row) * kWarpSize;
  const int64_t left = cols - col0;
  return {row * cols + col0, static_cast<int>(left < kWarpSize ? left : kWarpSize)};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The words a multi-tensor kernel walks over tensor t: its mask's layout, or, for a dense tensor
// (no mask), one row of 32-element words.
struct WordGrid {
  int64_t cols, words_per_row, words;
};
inline WordGrid word_grid(const at::Tensor& t, bool has_mask) {
  const MaskLayout lay(t);
  const int64_t cols = has_mask ? lay.cols : t.numel();
  const int64_t words_per_row = ceil_div(cols, kWarpSize);
  return {cols, words_per_row, (has_mask ? lay.rows : 1) * words_per_row};
}

}  // namespace dsd_kernels_cuda
