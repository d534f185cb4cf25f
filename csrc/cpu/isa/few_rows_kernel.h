// masked_linear for batches of at most few_rows::kMaxRows rows of fp32 (decoding) for each vector
// ISA: y = x (W*M)^T + b and dX = dY (W*M) read W and its mask words once and never write W*M,
// and dW = (dY^T X) * M is written once, through the mask (masked_linear_few_rows.cpp). Pruned
// lanes of W become exactly +0 (AND with the word's lanes), as in W*M. Sums in another order than a
// matmul, and in another on each vector width.
#pragma once
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

// Rows of W per pass: every accumulator (rows x batch rows), the batch's x vectors, one W vector
// and the mask's lane bits must fit the ISA's vector registers (16 on AVX2, 32 on AVX-512 and
// NEON); a divisor of 64, so a pass never straddles a row of tiles.
template <int MR>
constexpr int weight_rows_per_pass() {
  constexpr int registers = kLanes == 8 ? 16 : 32;
  return 4 * MR + MR + 2 <= registers ? 4 : 2;
}

// the lanes [k, k + lanes) of row n of W, exactly +0 where its mask words prune them
inline Vec masked_weight(const few_rows::Problem& pb, int64_t n, int64_t k, int64_t lanes) {
  const Vec wv = load_first(pb.w + n * pb.K + k, lanes);
  return wv & keep_lanes(keep_bits(pb.words + n * pb.words_per_row, k));
}

inline bool tile_skipped(const few_rows::Problem& pb, int64_t n, int64_t k) {
  return pb.kept_tiles != nullptr && k % few_rows::kTile == 0 &&
         pb.kept_tiles[(n / few_rows::kTile) * pb.tiles_k + k / few_rows::kTile] == 0;
}

template <int MR>
void forward_rows(const few_rows::Problem& pb, const float* x, const float* bias, float* y, int64_t n_begin,
                  int64_t n_end) {
  constexpr int R = weight_rows_per_pass<MR>();
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n_end - n0));
    Vec acc[R][MR];
    for (int r = 0; r < R; ++r) {
      for (int m = 0; m < MR; ++m) acc[r][m] = Vec(0.0f);
    }
    for (int64_t k = 0; k < pb.K; k += kLanes) {
      if (tile_skipped(pb, n0, k)) {  // the tile keeps nothing: W is not read
        k += few_rows::kTile - kLanes;
        continue;
      }
      const int64_t lanes = std::min<int64_t>(kLanes, pb.K - k);
      Vec xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = load_first(x + m * pb.K + k, lanes);
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const Vec wv = masked_weight(pb, n0 + r, k, lanes);
        for (int m = 0; m < MR; ++m) acc[r][m] = at::vec::fmadd(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int m = 0; m < MR; ++m) {
        const float sum = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc[r][m]);
        y[m * pb.N + n0 + r] = sum + (bias ? bias[n0 + r] : 0.0f);
      }
    }
  }
}

template <int MR>
void grad_input_rows(const few_rows::Problem& pb, const float* dy, float* dx, int64_t n_begin, int64_t n_end) {
  constexpr int R = 4;  // dx is read and written once per R rows of W: MR + R + 1 vectors live
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n_end - n0));
    for (int64_t k = 0; k < pb.K; k += kLanes) {
      if (tile_skipped(pb, n0, k)) {
        k += few_rows::kTile - kLanes;
        continue;
      }
      const int64_t lanes = std::min<int64_t>(kLanes, pb.K - k);
      Vec wv[R];
      for (int r = 0; r < R; ++r) wv[r] = r < rows ? masked_weight(pb, n0 + r, k, lanes) : Vec(0.0f);
      for (int m = 0; m < MR; ++m) {
        Vec acc = load_first(dx + m * pb.K + k, lanes);
        for (int r = 0; r < rows; ++r) acc = at::vec::fmadd(wv[r], Vec(dy[m * pb.N + n0 + r]), acc);
        store_first(acc, dx + m * pb.K + k, lanes);
      }
    }
  }
}

template <int MR>
void grad_weight_rows(const few_rows::Problem& pb, const float* dy, const float* x, float* dw, int64_t n_begin,
                      int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    Vec g[MR];
    for (int m = 0; m < MR; ++m) g[m] = Vec(dy[m * pb.N + n]);
    const int32_t* words = pb.words + n * pb.words_per_row;
    for (int64_t k = 0; k < pb.K; k += kLanes) {
      const int64_t lanes = std::min<int64_t>(kLanes, pb.K - k);
      Vec acc(0.0f);
      // a tile that keeps nothing is written as zeros without reading x
      if (pb.kept_tiles == nullptr ||
          pb.kept_tiles[(n / few_rows::kTile) * pb.tiles_k + k / few_rows::kTile] != 0) {
        acc = g[0] * load_first(x + k, lanes);
        for (int m = 1; m < MR; ++m) acc = at::vec::fmadd(g[m], load_first(x + m * pb.K + k, lanes), acc);
        acc = acc & keep_lanes(keep_bits(words, k));
      }
      store_first(acc, dw + n * pb.K + k, lanes);
    }
  }
}

}  // namespace

#define DSD_FEW_ROWS(kernel, rows, ...)  \
  switch (rows) {                        \
    case 1: return kernel<1>(__VA_ARGS__); \
    case 2: return kernel<2>(__VA_ARGS__); \
    case 3: return kernel<3>(__VA_ARGS__); \
    default: return kernel<4>(__VA_ARGS__); \
  }

void few_rows_forward(const few_rows::Problem& pb, int rows, const float* x, const float* bias, float* y,
                      int64_t n_begin, int64_t n_end) {
  DSD_FEW_ROWS(forward_rows, rows, pb, x, bias, y, n_begin, n_end)
}

void few_rows_grad_input(const few_rows::Problem& pb, int rows, const float* dy, float* dx, int64_t n_begin,
                         int64_t n_end) {
  DSD_FEW_ROWS(grad_input_rows, rows, pb, dy, dx, n_begin, n_end)
}

void few_rows_grad_weight(const few_rows::Problem& pb, int rows, const float* dy, const float* x, float* dw,
                          int64_t n_begin, int64_t n_end) {
  DSD_FEW_ROWS(grad_weight_rows, rows, pb, dy, x, dw, n_begin, n_end)
}
#undef DSD_FEW_ROWS

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
