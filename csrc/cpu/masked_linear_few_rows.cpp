// masked_linear for batches of at most kFewRows rows with fp32 (decoding): y = x (W*M)^T + b and
// dX = dY (W*M) read W and its mask words once and never write W*M (with unstructured masks a W*M
// copy cost another write and read of W; with tiles, packing), and dW = (dY^T X) * M is written
// once, through the mask. Masked-off lanes of W load as exactly 0 (as in W*M). Sums in another
// order than a matmul. On AVX-512 the intrinsics below (the words' halves as vector masks);
// elsewhere the portable kernels of csrc/cpu/isa/few_rows_kernel.h, on the capabilities where
// tile_gemm runs (use_tile_gemm).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "cpu_capability.h"
#include "masked_linear.h"

namespace dsd_kernels_cpu {
namespace masked_linear {
namespace {

#ifdef DSD_HAVE_AVX512_KERNELS
#define DSD_TILE_GEMM_AVX512 __attribute__((target("avx512f")))

// y[:, n] for rows n in [n_begin, n_end) (n_begin a multiple of 4): MR rows of x (MR <=
// kFewRows), four rows of W at a time (four independent sums per row of x, each x load used four
// times), 16 columns a step; with a grid, the columns of tiles that keep nothing are skipped (four
// rows lie in one row of tiles)
template <int MR>
DSD_TILE_GEMM_AVX512 void few_rows_forward(const float* x, const float* w, const int32_t* words, const float* bias,
                                           float* y, int64_t N, int64_t K, int64_t words_per_row, int64_t n_begin,
                                           int64_t n_end, const TileGrid* grid) {
  constexpr int R = 4;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n_end - n0));
    __m512 acc[R][MR];
    for (int r = 0; r < R; ++r) {
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 16) {
      if (grid && k % kTile == 0 && !grid->is_kept(n0 / kTile, k / kTile)) {
        k += kTile - 16;
        continue;
      }
      const __mmask16 limit = lanes16(K - k);
      __m512 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(limit, x + m * K + k);
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const __mmask16 keep = limit & keep_bits16(words + (n0 + r) * words_per_row, k);
        const __m512 wv = _mm512_maskz_loadu_ps(keep, w + (n0 + r) * K + k);
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int m = 0; m < MR; ++m) {
        y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n0 + r] : 0.0f);
      }
    }
  }
}

// dx[MR rows, K] = sum over rows n in [n_begin, n_end) of dy[:, n] * (W*M)[n, :], four weight
// rows per pass over dx (dx stays in cache; it is read and written once per four rows of W);
// n_begin a multiple of 4, so with a grid the four rows lie in one row of tiles, whose empty
// tiles are skipped
template <int MR>
DSD_TILE_GEMM_AVX512 void few_rows_grad_input(const float* dy, const float* w, const int32_t* words, float* dx,
                                              int64_t N, int64_t K, int64_t words_per_row, int64_t n_begin,
                                              int64_t n_end, const TileGrid* grid) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n_end - n0));
    for (int64_t k = 0; k < K; k += 16) {
      if (grid && k % kTile == 0 && !grid->is_kept(n0 / kTile, k / kTile)) {
        k += kTile - 16;
        continue;
      }
      const __mmask16 limit = lanes16(K - k);
      __m512 wv[4];
      for (int r = 0; r < 4; ++r) {
        if (r >= rows) {
          wv[r] = _mm512_setzero_ps();
          continue;
        }
        const __mmask16 keep = limit & keep_bits16(words + (n0 + r) * words_per_row, k);
        wv[r] = _mm512_maskz_loadu_ps(keep, w + (n0 + r) * K + k);
      }
      for (int m = 0; m < MR; ++m) {
        __m512 acc = _mm512_maskz_loadu_ps(limit, dx + m * K + k);
        for (int r = 0; r < rows; ++r) acc = _mm512_fmadd_ps(wv[r], _mm512_set1_ps(dy[m * N + n0 + r]), acc);
        _mm512_mask_storeu_ps(dx + m * K + k, limit, acc);
      }
    }
  }
}

// dw[n, :] = (sum over the MR rows m of dy[m, n] x[m, :]) where kept, exactly +0 where pruned, for
// rows n in [n_begin, n_end): every element of dW written once; with a grid, the tiles that keep
// nothing are written as zeros without reading x
template <int MR>
DSD_TILE_GEMM_AVX512 void few_rows_grad_weight(const float* dy, const float* x, const int32_t* words, float* dw,
                                               int64_t N, int64_t K, int64_t words_per_row, int64_t n_begin,
                                               int64_t n_end, const TileGrid* grid) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512 g[MR];
    for (int m = 0; m < MR; ++m) g[m] = _mm512_set1_ps(dy[m * N + n]);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 limit = lanes16(K - k);
      __m512 acc = _mm512_setzero_ps();
      __mmask16 keep = 0;
      if (!grid || grid->is_kept(n / kTile, k / kTile)) {
        keep = limit & keep_bits16(words + n * words_per_row, k);
        acc = _mm512_mul_ps(g[0], _mm512_maskz_loadu_ps(limit, x + k));
        for (int m = 1; m < MR; ++m) acc = _mm512_fmadd_ps(g[m], _mm512_maskz_loadu_ps(limit, x + m * K + k), acc);
      }
      _mm512_mask_storeu_ps(dw + n * K + k, limit, _mm512_maskz_mov_ps(keep, acc));
    }
  }
}

#endif

}  // namespace

// kernel<MR> for MR = rows (1 .. kFewRows)
#define DSD_FEW_ROWS(kernel, rows, ...)      \
  switch (rows) {                            \
    case 1: kernel<1>(__VA_ARGS__); break;   \
    case 2: kernel<2>(__VA_ARGS__); break;   \
    case 3: kernel<3>(__VA_ARGS__); break;   \
    default: kernel<4>(__VA_ARGS__); break;  \
  }

static_assert(kFewRows == few_rows::kMaxRows, "the portable kernels take at most kFewRows rows");

namespace {
// the AVX-512 loops run (else the portable ones of this capability)
bool avx512_loops() {
#ifdef DSD_HAVE_AVX512_KERNELS
  return cpu_has_avx512f();
#else
  return false;
#endif
}

few_rows::Problem problem(const at::Tensor& weight, const at::Tensor& words, const TileGrid* grid) {
  return {weight.data_ptr<float>(), words.data_ptr<int32_t>(), words.size(1), weight.size(0), weight.size(1),
          grid ? grid->kept : nullptr, grid ? grid->tiles_k : 0};
}
}  // namespace

// x2d (M <= kFewRows, K) contiguous fp32; weight (N, K) contiguous -> y (M, N); grid: the kept
// tiles, or nullptr (every tile)
at::Tensor few_rows_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& words,
                            const std::optional<at::Tensor>& bias, const TileGrid* grid) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x2d.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const few_rows::Problem pb = problem(weight, words, grid);
  const auto portable = DSD_ISA_KERNEL(few_rows_forward);
  const bool avx512 = avx512_loops();
  // groups of 4 rows of W (the kernels' step divides it): a group never straddles a row of tiles
  at::parallel_for(0, (N + 3) / 4, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    const int64_t n_begin = begin * 4, n_end = std::min(N, end * 4);
    if (!avx512) return portable(pb, static_cast<int>(M), x2d.data_ptr<float>(), bp, y.data_ptr<float>(), n_begin, n_end);
#ifdef DSD_HAVE_AVX512_KERNELS
    DSD_FEW_ROWS(few_rows_forward, M, x2d.data_ptr<float>(), weight.data_ptr<float>(), words.data_ptr<int32_t>(), bp,
                 y.data_ptr<float>(), N, K, words.size(1), n_begin, n_end, grid);
#endif
  });
  return y;
}

// grad2d (M <= kFewRows, N), x2d (M, K) contiguous fp32 -> dW (N, K), exactly +0 where pruned
at::Tensor few_rows_grad_weight(const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& words,
                                const TileGrid* grid) {
  const int64_t M = grad2d.size(0), N = grad2d.size(1), K = x2d.size(1);
  at::Tensor dw = at::empty({N, K}, x2d.options());
  // W itself is not read: its shape, for the problem's sizes
  few_rows::Problem pb{nullptr, words.data_ptr<int32_t>(), words.size(1), N, K, grid ? grid->kept : nullptr,
                       grid ? grid->tiles_k : 0};
  const auto portable = DSD_ISA_KERNEL(few_rows_grad_weight);
  const bool avx512 = avx512_loops();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    if (!avx512) {
      return portable(pb, static_cast<int>(M), grad2d.data_ptr<float>(), x2d.data_ptr<float>(), dw.data_ptr<float>(),
                      begin, end);
    }
#ifdef DSD_HAVE_AVX512_KERNELS
    DSD_FEW_ROWS(few_rows_grad_weight, M, grad2d.data_ptr<float>(), x2d.data_ptr<float>(), words.data_ptr<int32_t>(),
                 dw.data_ptr<float>(), N, K, words.size(1), begin, end, grid);
#endif
  });
  return dw;
}

// grad2d (M <= kFewRows, N) contiguous fp32 -> dX (M, K): threads sum their rows of W into
// buffers of their own, added up at the end
at::Tensor few_rows_grad_input(const at::Tensor& grad2d, const at::Tensor& weight, const at::Tensor& words,
                               const TileGrid* grid) {
  const int64_t M = grad2d.size(0), N = grad2d.size(1), K = weight.size(1);
  // whole rows of tiles per chunk
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, (per_thread + kTile - 1) / kTile) * kTile;
  const int64_t chunks = std::max<int64_t>(1, (N + chunk - 1) / chunk);
  at::Tensor partial = at::zeros({chunks, M, K}, grad2d.options());
  const few_rows::Problem pb = problem(weight, words, grid);
  const auto portable = DSD_ISA_KERNEL(few_rows_grad_input);
  const bool avx512 = avx512_loops();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t n_begin = c * chunk, n_end = std::min(N, (c + 1) * chunk);
      if (!avx512) {
        portable(pb, static_cast<int>(M), grad2d.data_ptr<float>(), partial[c].data_ptr<float>(), n_begin, n_end);
        continue;
      }
#ifdef DSD_HAVE_AVX512_KERNELS
      DSD_FEW_ROWS(few_rows_grad_input, M, grad2d.data_ptr<float>(), weight.data_ptr<float>(),
                   words.data_ptr<int32_t>(), partial[c].data_ptr<float>(), N, K, words.size(1), n_begin, n_end, grid);
#endif
    }
  });
  return chunks == 1 ? partial[0] : partial.sum(0);
}
#undef DSD_FEW_ROWS

// where tile_gemm runs (AVX2, AVX-512; the portable default build only when asked)
bool use_few_rows(const at::Tensor& x2d, std::initializer_list<at::Tensor> tensors) {
  return x2d.size(0) >= 1 && x2d.size(0) <= kFewRows && use_tile_gemm(tensors);
}

}  // namespace masked_linear
}  // namespace dsd_kernels_cpu
