// masked_linear's CPU parts shared by its files: the kept-tile grid, and the kernels beside the
// ATen matmuls: masked_linear_tiles.cpp (the kept tiles of fp32 through tile_gemm, csrc/cpu/isa) and
// masked_linear_few_rows.cpp (few rows, AVX-512). masked_linear.cpp checks inputs and chooses.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "isa/isa_kernels.h"

namespace dsd_kernels_cpu {
namespace masked_linear {

constexpr int64_t kTile = tile_gemm::kTile;  // tile rows and columns (tile_structure.TILE)
constexpr int64_t kTileWords = kTile / 32;   // mask words per tile row

// The kept-tile flags kept[n * tiles_k + k] (int32, (tiles_n, tiles_k)), checked against W.
struct TileGrid {
  int64_t tiles_n = 0, tiles_k = 0;
  const int32_t* kept = nullptr;
  bool is_kept(int64_t n, int64_t k) const { return kept[n * tiles_k + k] != 0; }
};

// f(first, count) for every run of adjacent kept tiles (n, k) along k (along_k) or (n, k) along

// the grid of tile_kept (checked against weight's shape)
TileGrid tile_grid(const at::Tensor& tile_kept, const at::Tensor& weight);

inline int64_t tile_extent(int64_t size, int64_t tile) { return std::min(kTile, size - tile * kTile); }

// Whether fp32 kept tiles go through tile_gemm here (DSD_KERNELS_TILE_GEMM: 0 never, 1 on every
// capability including the portable default build; unset: on AVX2 and AVX-512), and with these
// operands (all fp32).
bool tile_gemm_enabled();
bool use_tile_gemm(std::initializer_list<at::Tensor> tensors);

// The products over the kept tiles (masked_linear_tiles.cpp), every output element written once:
// y (M, N) = x (W*M)^T + bias; dX (M, K) = dY (W*M); dW (N, K) = (dY^T x) * M, exactly +0 where pruned.
at::Tensor tile_gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                             const std::optional<at::Tensor>& bias, const TileGrid& g);
at::Tensor tile_gemm_grad_input(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& words,
                                const TileGrid& g);
at::Tensor tile_gemm_grad_weight(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& words,
                                 const TileGrid& g);

// Batches of at most kFewRows rows (fp32, where tile_gemm runs; masked_linear_few_rows.cpp) read W
// and its mask words once and write no W*M; grid: the kept tiles, or nullptr (every tile).
constexpr int64_t kFewRows = 4;
bool use_few_rows(const at::Tensor& x2d, std::initializer_list<at::Tensor> tensors);
at::Tensor few_rows_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& words,
                            const std::optional<at::Tensor>& bias, const TileGrid* grid);
at::Tensor few_rows_grad_input(const at::Tensor& grad2d, const at::Tensor& weight, const at::Tensor& words,
                               const TileGrid* grid);
at::Tensor few_rows_grad_weight(const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& words,
                                const TileGrid* grid);

}  // namespace masked_linear
}  // namespace dsd_kernels_cpu
