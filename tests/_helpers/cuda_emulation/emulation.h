// A small CUDA execution model on the CPU, so the csrc/cuda kernels' logic can be tested on a
// machine without a GPU (tests/test_cuda_emulation.py). It is not a simulator of the hardware:
// it runs each block's threads as real std::threads, one block at a time, with
//   __syncthreads      a std::barrier over the block's threads,
//   __ballot_sync      a std::barrier over the warp's 32 threads and a shared vote array,
//   atomicAdd          std::atomic_ref,
//   __shared__         function-local statics (one block runs at a time, so one copy suffices),
//   cub::BlockScan     a shared array, two barriers and a serial sum.
// A thread that returns leaves both barriers (arrive_and_drop), as exited threads do on a GPU.
// What it cannot show: speed, memory-coalescing, races the real memory model allows but these
// barriers forbid. Those need the `gpu` tests on a real device.
#pragma once
#define DSD_CUDA_EMULATION 1

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dsd_emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dsd_emu_dim3 threadIdx, blockIdx;

namespace dsd_cuda_emu {

constexpr int kWarp = 32;

struct Block {
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<unsigned> votes;
  explicit Block(int threads) : block_barrier(threads), votes(threads, 0) {
    for (int w = 0; w < (threads + kWarp - 1) / kWarp; ++w) {
      const int lanes = std::min(kWarp, threads - w * kWarp);
      warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
    }
  }
};
inline thread_local Block* current_block = nullptr;

// Runs kernel(args...) over `grid` blocks of `threads` threads, block after block. The threads
// are made once per launch and run every block: between blocks they meet at a barrier whose
// completion step (run once, before any thread goes on) sets up the next block. Creating a
// block's threads anew for each block was most of the emulation's time.
template <typename Kernel>
struct Launcher {
  Kernel kernel;
  int64_t grid;
  int threads;
  template <typename... Args>
  void operator()(Args... args) const {
    if (grid <= 0) return;
    int64_t b = 0;
    auto block = std::make_unique<Block>(threads);
    auto next_block = [&]() noexcept {
      if (++b < grid) block = std::make_unique<Block>(threads);
    };
    std::barrier<decltype(next_block)> between_blocks(threads, next_block);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        while (b < grid) {  // b and block change only in the completion step
          blockIdx.x = static_cast<unsigned>(b);
          current_block = block.get();
          kernel(args...);
          current_block->warp_barriers[t / kWarp]->arrive_and_drop();
          current_block->block_barrier.arrive_and_drop();
          between_blocks.arrive_and_wait();
        }
      });
    }
    for (auto& th : pool) th.join();
  }
};
template <typename Kernel>
Launcher<Kernel> launch(Kernel kernel, int64_t grid, int threads) {
  return {kernel, grid, threads};
}

}  // namespace dsd_cuda_emu

#define DSD_LAUNCH(grid, threads, stream, ...) \
  dsd_cuda_emu::launch(&__VA_ARGS__, static_cast<int64_t>(grid), static_cast<int>(threads))
#define DSD_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(dsd_kernels_cuda_emu, CPU, m)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

inline void __syncthreads() { dsd_cuda_emu::current_block->block_barrier.arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned /*member mask: every lane votes here*/, bool predicate) {
  auto* block = dsd_cuda_emu::current_block;
  const int lane = threadIdx.x % dsd_cuda_emu::kWarp;
  const int first = threadIdx.x - lane;
  auto& barrier = *block->warp_barriers[threadIdx.x / dsd_cuda_emu::kWarp];
  block->votes[threadIdx.x] = predicate ? 1u : 0u;
  barrier.arrive_and_wait();
  unsigned word = 0;
  const int lanes = std::min<int>(dsd_cuda_emu::kWarp, block->votes.size() - first);
  for (int j = 0; j < lanes; ++j) word |= block->votes[first + j] << j;
  barrier.arrive_and_wait();  // everyone has read the votes before they are overwritten
  return word;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
// the explicitly rounded arithmetic intrinsics: one IEEE operation each (the emulation is built
// with -ffp-contract=off, so nothing is fused that CUDA would not fuse)
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}
using std::max;
using std::min;

namespace cub {
template <typename T, int kThreads>
struct BlockScan {
  struct TempStorage {
    T values[kThreads];
  };
  TempStorage& storage;
  explicit BlockScan(TempStorage& s) : storage(s) {}
  void ExclusiveSum(T input, T& output) {
    storage.values[threadIdx.x] = input;
    __syncthreads();
    T sum = 0;
    for (unsigned i = 0; i < threadIdx.x; ++i) sum += storage.values[i];
    __syncthreads();
    output = sum;
  }
};
}  // namespace cub

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(const at::Device&) {}
};
inline void* getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
using cudaStream_t = void*;
