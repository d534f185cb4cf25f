// masked_linear on CPU: the mask is applied straight from the packed words (no unpacked copy of
// the mask is kept), in parallel.
//
// Without `tile_kept`: one ATen matmul (MKL/oneDNN) on W*M, the mask applied to W before the
// forward and dX matmuls and to dW after its matmul.
//
// With `tile_kept` (the (kTile x kTile) tiles of the mask that keep anything, from
// tile_structure.py, which also decides when skipping pays) only kept tiles are multiplied, two ways:
// - fp32 on a CPU with AVX-512F (`tile_gemm_available`): this file's register-tiled kernel
//   (tile_gemm), which reads x, dY and the kept tiles of W*M (packed per call, mask applied while
//   packing) and writes every output element once: no zero-fill pass, no read-modify-write of the
//   output per tile, no per-tile matmul call. It beats the BLAS calls on small tiles, and on CPUs
//   where the BLAS takes its AVX2 path it does more FLOPs per cycle too.
// - otherwise one ATen matmul per run of adjacent kept tiles along the reduced dimension, on strided
//   views (no copies), threads splitting the output tiles.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../op_args.h"
#include "../op_schemas.h"
#include "common.h"

namespace dsd_kernels_cpu {
namespace {

constexpr int64_t kTile = 64;                // tile rows and columns (tile_structure.TILE)
constexpr int64_t kTileWords = kTile / 32;  // mask words per tile row

// The kept-tile flags kept[n * tiles_k + k] (int32, (tiles_n, tiles_k)), checked against W.
struct TileGrid {
  int64_t tiles_n = 0, tiles_k = 0;
  const int32_t* kept = nullptr;
  bool is_kept(int64_t n, int64_t k) const { return kept[n * tiles_k + k] != 0; }
};

// f(first, count) for every run of adjacent kept tiles (n, k) along k (along_k) or (n, k) along
// n for fixed k (!along_k); first and count in tiles.
template <typename F>
void for_each_run(const TileGrid& g, int64_t fixed, bool along_k, F f) {
  const int64_t len = along_k ? g.tiles_k : g.tiles_n;
  for (int64_t i = 0; i < len;) {
    const auto kept_at = [&](int64_t j) { return along_k ? g.is_kept(fixed, j) : g.is_kept(j, fixed); };
    if (!kept_at(i)) {
      ++i;
      continue;
    }
    int64_t j = i;
    while (j < len && kept_at(j)) ++j;
    f(i, j - i);
    i = j;
  }
}

TileGrid tile_grid(const at::Tensor& tile_kept, const at::Tensor& weight) {
  TileGrid g;
  g.tiles_n = (weight.size(0) + kTile - 1) / kTile;
  g.tiles_k = (weight.size(1) + kTile - 1) / kTile;
  TORCH_CHECK(tile_kept.device() == weight.device() && tile_kept.scalar_type() == at::kInt && tile_kept.is_contiguous() &&
                  tile_kept.dim() == 2 && tile_kept.size(0) == g.tiles_n && tile_kept.size(1) == g.tiles_k,
              "masked_linear: tile_kept must be contiguous int32 of shape (", g.tiles_n, ", ",
              g.tiles_k, ") for a weight of shape ", weight.sizes());
  g.kept = tile_kept.data_ptr<int32_t>();
  return g;
}

// ---------------------------------------------------------------- tile_gemm: the AVX-512 kernel
// C[r, 0:cols] = init + sum over segments s, k < s.kc of A[r, s.a_off + k] * s.b[k * b_ks + 0:cols]
// for the rows r of one output tile (cols <= kTile), A read through strides (a_rs, a_ks) so that
// x, dY and dY^T are used where they lie. Register tile: kRows rows x 64 columns (24 of the 32
// vector registers accumulate; each A element, broadcast, meets 4 vectors of B).
namespace tile_gemm {

constexpr int kRows = 6;

struct Segment {
  int64_t a_off;   // A's first reduction column
  const float* b;  // B's first row (kTile floats per row, b_ks apart)
  int64_t kc;      // reduction steps
};

struct Panel {
  const float* a;
  int64_t a_rs, a_ks;
  const Segment* segs;
  int64_t num_segs, b_ks;
  float* c;
  int64_t c_rs, cols;
  const float* init;          // kTile values added to every row (the bias), or nullptr: 0
  const int32_t* keep_words;  // C's mask words (2 per row of the tile, words_rs apart), or nullptr
  int64_t words_rs;
  bool accumulate = false;    // start from C's values instead of init
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSD_TILE_GEMM_AVX512 __attribute__((target("avx512f")))

template <int MR>
DSD_TILE_GEMM_AVX512 void rows(const Panel& p, int64_t r0) {
  __mmask16 cm[4];
  #pragma GCC unroll 8
  for (int j = 0; j < 4; ++j) {
    const int64_t n = std::clamp<int64_t>(p.cols - 16 * j, 0, 16);
    cm[j] = static_cast<__mmask16>((1u << n) - 1u);
  }
  __m512 acc[MR][4];
  #pragma GCC unroll 8
  for (int j = 0; j < 4; ++j) {
    const __m512 v = p.init ? _mm512_maskz_loadu_ps(cm[j], p.init + 16 * j) : _mm512_setzero_ps();
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][j] = p.accumulate ? _mm512_maskz_loadu_ps(cm[j], p.c + (r0 + r) * p.c_rs + 16 * j) : v;
    }
  }
  for (int64_t s = 0; s < p.num_segs; ++s) {
    const Segment seg = p.segs[s];
    const float* a = p.a + r0 * p.a_rs + seg.a_off * p.a_ks;
    const float* b = seg.b;
    for (int64_t k = 0; k < seg.kc; ++k, a += p.a_ks, b += p.b_ks) {
      const __m512 b0 = _mm512_maskz_loadu_ps(cm[0], b), b1 = _mm512_maskz_loadu_ps(cm[1], b + 16);
      const __m512 b2 = _mm512_maskz_loadu_ps(cm[2], b + 32), b3 = _mm512_maskz_loadu_ps(cm[3], b + 48);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * p.a_rs]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* c = p.c + (r0 + r) * p.c_rs;
    #pragma GCC unroll 8
    for (int j = 0; j < 4; ++j) {
      if (cm[j] == 0) continue;
      __m512 v = acc[r][j];
      if (p.keep_words) {  // exactly +0 where pruned, whatever the sum (NaN included)
        const uint32_t w = static_cast<uint32_t>(p.keep_words[(r0 + r) * p.words_rs + j / 2]);
        v = _mm512_maskz_mov_ps(static_cast<__mmask16>(j % 2 ? w >> 16 : w & 0xFFFFu), v);
      }
      if (cm[j] == 0xFFFF) {
        _mm512_storeu_ps(c + 16 * j, v);
      } else {
        _mm512_mask_storeu_ps(c + 16 * j, cm[j], v);
      }
    }
  }
}

// rows [r_begin, r_end) of the panel's output tile
DSD_TILE_GEMM_AVX512 void panel_rows(const Panel& p, int64_t r_begin, int64_t r_end) {
  int64_t r = r_begin;
  for (; r + kRows <= r_end; r += kRows) rows<kRows>(p, r);
  switch (r_end - r) {
    case 5: rows<5>(p, r); break;
    case 4: rows<4>(p, r); break;
    case 3: rows<3>(p, r); break;
    case 2: rows<2>(p, r); break;
    case 1: rows<1>(p, r); break;
    default: break;
  }
}

// dst (kTile x kTile, row-major) = the tile of W*M at rows [r0, r0 + rows), columns [c0, c0 + cols),
// zero-padded; transposed: dst[col][row].
DSD_TILE_GEMM_AVX512 void pack_tile(const float* w, const int32_t* words, const MaskLayout& lay,
                                    int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                    bool transposed, float* dst) {
  alignas(64) float tile[kTile * kTile];
  float* out = transposed ? tile : dst;
  for (int64_t r = 0; r < kTile; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = r < rows ? std::clamp<int64_t>(cols - 16 * j, 0, 16) : 0;
      __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      if (m != 0) {
        const uint32_t word = static_cast<uint32_t>(words[(r0 + r) * lay.words_per_row + c0 / 32 + j / 2]);
        m &= static_cast<__mmask16>(j % 2 ? word >> 16 : word & 0xFFFFu);
      }
      // masked-off lanes read nothing and come out +0
      _mm512_storeu_ps(out + r * kTile + 16 * j,
                       _mm512_maskz_loadu_ps(m, w + (r0 + r) * lay.cols + c0 + 16 * j));
    }
  }
  if (!transposed) return;
  for (int64_t i = 0; i < kTile; ++i) {
    for (int64_t j = 0; j < kTile; ++j) dst[j * kTile + i] = tile[i * kTile + j];
  }
}

// Few rows (decoding): y = x (W*M)^T + b and dX = dY (W*M) read W and its mask words once and
// never write W*M (with unstructured masks a W*M copy cost another write and read of W; with
// tiles, packing), and dW = (dY^T X) * M is written once, through the mask. Masked-off lanes of W
// load as exactly 0 (as in W*M). Sums in another order than a matmul.

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

#else
void panel_rows(const Panel&, int64_t, int64_t) { TORCH_CHECK(false, "tile_gemm: not built for this CPU"); }
void pack_tile(const float*, const int32_t*, const MaskLayout&, int64_t, int64_t, int64_t, int64_t,
               bool, float*) {
  TORCH_CHECK(false, "tile_gemm: not built for this CPU");
}
#endif

}  // namespace tile_gemm

void check_words(const at::Tensor& t, const at::Tensor& words) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "masked_linear: weights must be contiguous 2-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "masked_linear: weight is ", t.scalar_type(),
              "; it must be floating");
  dsd_kernels_args::check_words("masked_linear", 0, words, t, "weight");
}

// x2d (M, K) of weight's dtype and device, and with them grad2d (M, N) or bias (N,): the
// matmuls index them by those sizes.
void check_operands(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor* grad2d,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x2d.dim() == 2 && x2d.size(1) == weight.size(1) && x2d.scalar_type() == weight.scalar_type() &&
                  x2d.device() == weight.device() && x2d.layout() == at::kStrided,
              "masked_linear: x must be a strided (rows, ", weight.size(1), ") tensor of weight's dtype and device, got ",
              x2d.sizes(), " ", x2d.scalar_type(), " on ", x2d.device());
  TORCH_CHECK(grad2d == nullptr || (grad2d->dim() == 2 && grad2d->size(0) == x2d.size(0) &&
                                    grad2d->size(1) == weight.size(0) && grad2d->scalar_type() == weight.scalar_type() &&
                                    grad2d->device() == weight.device() && grad2d->layout() == at::kStrided),
              "masked_linear: grad must be a strided (", x2d.size(0), ", ", weight.size(0),
              ") tensor of weight's dtype and device");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device()),
              "masked_linear: bias must be a (", weight.size(0), ",) tensor of weight's dtype and device");
}

// W*M (out of place, or in place on t, which has W's shape; words checked by the caller). With
// `grid`, only inside kept tiles: the rest of the result is left unwritten, and the tiled matmuls
// never read it.
at::Tensor masked(const at::Tensor& t, const at::Tensor& words, bool in_place,
                  const TileGrid* grid = nullptr) {
  const MaskLayout lay(t);
  at::Tensor out = in_place ? t : at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "masked_linear", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int32_t* w = words.data_ptr<int32_t>();
#ifdef DSD_HAVE_AVX512_KERNELS
    if (grid == nullptr && std::is_same_v<scalar_t, float> && cpu_has_avx512f()) {
      at::parallel_for(0, lay.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(lay.cols, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          mask_row_avx512(reinterpret_cast<const float*>(src) + r * lay.cols,
                          reinterpret_cast<float*>(dst) + r * lay.cols, w + r * lay.words_per_row, lay.cols);
        }
      });
      return;
    }
#endif
    if (grid == nullptr) {
      parallel_for_words(lay, 2048, [&](int64_t i, int64_t base, int64_t len) {
        mask_word(src + base, dst + base, static_cast<uint32_t>(w[i]), len);
      });
      return;
    }
    at::parallel_for(0, grid->tiles_n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t k = 0; k < grid->tiles_k; ++k) {
          if (!grid->is_kept(n, k)) continue;
          for (int64_t r = n * kTile; r < std::min(lay.rows, (n + 1) * kTile); ++r) {
            for (int64_t i = k * kTileWords; i < std::min(lay.words_per_row, (k + 1) * kTileWords); ++i) {
              const int64_t col = i * 32, base = r * lay.cols + col;
              mask_word(src + base, dst + base, static_cast<uint32_t>(w[r * lay.words_per_row + i]),
                        std::min<int64_t>(32, lay.cols - col));
            }
          }
        }
      }
    });
  });
  return out;
}

inline at::Tensor tile_cols(const at::Tensor& t, int64_t tile) {
  return t.narrow(1, tile * kTile, std::min(kTile, t.size(1) - tile * kTile));
}
inline at::Tensor tile_rows(const at::Tensor& t, int64_t tile) {
  return t.narrow(0, tile * kTile, std::min(kTile, t.size(0) - tile * kTile));
}
// `count` tiles from tile `first` along dim (the last tile may be partial)
inline at::Tensor tile_span(const at::Tensor& t, int64_t dim, int64_t first, int64_t count) {
  return t.narrow(dim, first * kTile, std::min(count * kTile, t.size(dim) - first * kTile));
}

// ---------------------------------------------------------------- the tile_gemm products
// DSD_KERNELS_TILE_GEMM=0 (read at each call) sends fp32 to the ATen matmuls instead, e.g. to
// compare the two.
bool tile_gemm_enabled() {
  const char* env = std::getenv("DSD_KERNELS_TILE_GEMM");
  return cpu_has_avx512f() && !(env != nullptr && std::strcmp(env, "0") == 0);
}

bool use_tile_gemm(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.scalar_type() != at::kFloat) return false;
  }
  return tile_gemm_enabled();
}

// Batches of at most this many rows with unstructured masks take the few-rows kernels (fp32,
// AVX-512; tile_gemm_enabled), which read W once and write no W*M.
constexpr int64_t kFewRows = 4;

#ifdef DSD_HAVE_AVX512_KERNELS
// kernel<MR> for MR = rows (1 .. kFewRows)
#define DSD_FEW_ROWS(kernel, rows, ...)                 \
  switch (rows) {                                       \
    case 1: tile_gemm::kernel<1>(__VA_ARGS__); break;   \
    case 2: tile_gemm::kernel<2>(__VA_ARGS__); break;   \
    case 3: tile_gemm::kernel<3>(__VA_ARGS__); break;   \
    default: tile_gemm::kernel<4>(__VA_ARGS__); break;  \
  }

// x2d (M <= kFewRows, K) contiguous fp32; weight (N, K) contiguous -> y (M, N); grid: the kept
// tiles, or nullptr (every tile)
at::Tensor few_rows_forward(const at::Tensor& x2d, const at::Tensor& weight, const at::Tensor& words,
                            const std::optional<at::Tensor>& bias, const TileGrid* grid) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x2d.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // groups of 4 rows of W (the kernel's step): a group never straddles a row of tiles
  at::parallel_for(0, (N + 3) / 4, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    DSD_FEW_ROWS(few_rows_forward, M, x2d.data_ptr<float>(), weight.data_ptr<float>(), words.data_ptr<int32_t>(), bp,
                 y.data_ptr<float>(), N, K, words.size(1), begin * 4, std::min(N, end * 4), grid);
  });
  return y;
}

// grad2d (M <= kFewRows, N), x2d (M, K) contiguous fp32 -> dW (N, K), exactly +0 where pruned
at::Tensor few_rows_grad_weight(const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& words,
                                const TileGrid* grid) {
  const int64_t M = grad2d.size(0), N = grad2d.size(1), K = x2d.size(1);
  at::Tensor dw = at::empty({N, K}, x2d.options());
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    DSD_FEW_ROWS(few_rows_grad_weight, M, grad2d.data_ptr<float>(), x2d.data_ptr<float>(), words.data_ptr<int32_t>(),
                 dw.data_ptr<float>(), N, K, words.size(1), begin, end, grid);
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
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      DSD_FEW_ROWS(few_rows_grad_input, M, grad2d.data_ptr<float>(), weight.data_ptr<float>(),
                   words.data_ptr<int32_t>(), partial[c].data_ptr<float>(), N, K, words.size(1), c * chunk,
                   std::min(N, (c + 1) * chunk), grid);
    }
  });
  return chunks == 1 ? partial[0] : partial.sum(0);
}
#undef DSD_FEW_ROWS
#else
at::Tensor few_rows_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const TileGrid*) {
  TORCH_CHECK(false, "masked_linear: the few-rows kernels are not built for this CPU");
  return {};
}
at::Tensor few_rows_grad_weight(const at::Tensor&, const at::Tensor&, const at::Tensor&, const TileGrid*) {
  TORCH_CHECK(false, "masked_linear: the few-rows kernels are not built for this CPU");
  return {};
}
at::Tensor few_rows_grad_input(const at::Tensor&, const at::Tensor&, const at::Tensor&, const TileGrid*) {
  TORCH_CHECK(false, "masked_linear: the few-rows kernels are not built for this CPU");
  return {};
}
#endif

// Whether a batch of x2d's rows takes the few-rows kernels (tensors: every operand, all fp32)
bool use_few_rows(const at::Tensor& x2d, std::initializer_list<at::Tensor> tensors) {
#ifdef DSD_HAVE_AVX512_KERNELS
  return x2d.size(0) >= 1 && x2d.size(0) <= kFewRows && use_tile_gemm(tensors);
#else
  return false;
#endif
}

// The kept tiles grouped by n-tile (by_n) or by k-tile: group g's tiles are other[ptr[g], ptr[g+1]).
struct KeptLists {
  std::vector<int64_t> ptr, other;
};

KeptLists kept_lists(const TileGrid& g, bool by_n) {
  KeptLists l;
  const int64_t groups = by_n ? g.tiles_n : g.tiles_k, len = by_n ? g.tiles_k : g.tiles_n;
  l.ptr.push_back(0);
  for (int64_t i = 0; i < groups; ++i) {
    for (int64_t j = 0; j < len; ++j) {
      if (by_n ? g.is_kept(i, j) : g.is_kept(j, i)) l.other.push_back(j);
    }
    l.ptr.push_back(static_cast<int64_t>(l.other.size()));
  }
  return l;
}

inline int64_t tile_extent(int64_t size, int64_t tile) { return std::min(kTile, size - tile * kTile); }

// run(tile, r_begin, r_end) for every output tile over all M rows. The rows are cut into one chunk
// per thread (balanced whatever the tiles' costs), and a chunk into slices of A (rows of
// a_row_bytes) that fit in L2: a thread sweeps a slice over all its tiles before the next, so A is
// read from memory once, while a tile's packed operands (a few tiles, from L2 or L3) meet many
// rows. Few rows: the threads split tiles.
constexpr int64_t kRowSliceBytes = 512 * 1024;

template <typename F>
void for_row_chunks(int64_t M, int64_t tiles, int64_t a_row_bytes, const F& run) {
  constexpr int64_t kRows = tile_gemm::kRows;
  const int64_t blocks = (M + kRows - 1) / kRows;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t chunk_rows = (blocks + chunks - 1) / chunks * kRows;
  const int64_t slice_rows = std::max<int64_t>(kRows, kRowSliceBytes / std::max<int64_t>(a_row_bytes, 1) / kRows * kRows);
  at::parallel_for(0, chunks * tiles, 1, [&](int64_t begin, int64_t end) {
    if (tiles == 0) return;
    for (int64_t c = begin / tiles; c <= (end - 1) / tiles; ++c) {  // items are chunk-major
      const int64_t t_begin = std::max(begin, c * tiles) - c * tiles, t_end = std::min(end, (c + 1) * tiles) - c * tiles;
      const int64_t r_end = std::min(M, (c + 1) * chunk_rows);
      for (int64_t r0 = c * chunk_rows; r0 < r_end; r0 += slice_rows) {
        for (int64_t t = t_begin; t < t_end; ++t) run(t, r0, std::min(r_end, r0 + slice_rows));
      }
    }
  });
}

// The kept tiles of W*M, one kTile x kTile block each (transposed: B = (W*M)^T for the forward),
// in the order of `lists`, and one Segment per tile reading it.
std::pair<at::Tensor, std::vector<tile_gemm::Segment>> pack_kept(const at::Tensor& w, const at::Tensor& words,
                                                                  const KeptLists& lists, bool by_n) {
  const MaskLayout lay(w);
  const int64_t N = w.size(0), K = w.size(1), count = static_cast<int64_t>(lists.other.size());
  at::Tensor packed = at::empty({count, kTile, kTile}, w.options());
  float* pk = packed.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int32_t* wd = words.data_ptr<int32_t>();
  std::vector<tile_gemm::Segment> segs(count);
  for (size_t g = 0; g + 1 < lists.ptr.size(); ++g) {
    for (int64_t i = lists.ptr[g]; i < lists.ptr[g + 1]; ++i) {
      const int64_t n = by_n ? g : lists.other[i], k = by_n ? lists.other[i] : g;
      // forward: reduce over k (x's columns); dX: over n (dY's columns)
      segs[i] = by_n ? tile_gemm::Segment{k * kTile, pk + i * kTile * kTile, tile_extent(K, k)}
                     : tile_gemm::Segment{n * kTile, pk + i * kTile * kTile, tile_extent(N, n)};
    }
  }
  at::parallel_for(0, lists.ptr.size() - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t i = lists.ptr[g]; i < lists.ptr[g + 1]; ++i) {
        const int64_t n = by_n ? g : lists.other[i], k = by_n ? lists.other[i] : g;
        tile_gemm::pack_tile(wp, wd, lay, n * kTile, tile_extent(N, n), k * kTile, tile_extent(K, k),
                             /*transposed=*/by_n, pk + i * kTile * kTile);
      }
    }
  });
  return {packed, std::move(segs)};
}

// y (M, N) = x (M, K) (W*M)^T + bias over the kept tiles; every element of y written once.
at::Tensor tile_gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                             const std::optional<at::Tensor>& bias, const TileGrid& g) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const KeptLists lists = kept_lists(g, /*by_n=*/true);
  const auto [packed, segs] = pack_kept(w, words, lists, /*by_n=*/true);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(M, g.tiles_n, K * 4, [&](int64_t n, int64_t r0, int64_t r1) {
    const tile_gemm::Panel p{xp, K, 1, segs.data() + lists.ptr[n], lists.ptr[n + 1] - lists.ptr[n], kTile,
                             yp + n * kTile, N, tile_extent(N, n),
                             b.defined() ? b.data_ptr<float>() + n * kTile : nullptr, nullptr, 0};
    tile_gemm::panel_rows(p, r0, r1);
  });
  return y;
}

// dX (M, K) = dY (M, N) (W*M) over the kept tiles; every element of dX written once.
at::Tensor tile_gemm_grad_input(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& words,
                                const TileGrid& g) {
  const int64_t M = grad.size(0), N = w.size(0), K = w.size(1);
  const KeptLists lists = kept_lists(g, /*by_n=*/false);
  const auto [packed, segs] = pack_kept(w, words, lists, /*by_n=*/false);
  at::Tensor dx = at::empty({M, K}, grad.options());
  const float* gp = grad.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  for_row_chunks(M, g.tiles_k, N * 4, [&](int64_t k, int64_t r0, int64_t r1) {
    const tile_gemm::Panel p{gp, N, 1, segs.data() + lists.ptr[k], lists.ptr[k + 1] - lists.ptr[k], kTile,
                             dxp + k * kTile, K, tile_extent(K, k), nullptr, nullptr, 0};
    tile_gemm::panel_rows(p, r0, r1);
  });
  return dx;
}

// [begin, end) of the items (their costs given) that part `part` of `parts` takes: contiguous
// ranges of about equal cost.
std::pair<int64_t, int64_t> cost_range(const std::vector<int64_t>& prefix_cost, int64_t part, int64_t parts) {
  const int64_t items = static_cast<int64_t>(prefix_cost.size()) - 1, total = prefix_cost.back();
  const auto first_at = [&](int64_t p) {  // first item whose cost starts at or after p/parts of the total
    if (p >= parts) return items;
    return static_cast<int64_t>(std::lower_bound(prefix_cost.begin(), prefix_cost.end() - 1,
                                                 (total * p + parts - 1) / parts) - prefix_cost.begin());
  };
  return {first_at(part), first_at(part + 1)};
}

// dW (N, K) = (dY^T x) * M. Threads split the k-tiles (columns of tiles) by cost and take theirs
// kDwColumns at a time. The rows of x and dY go by kDwRows at a time: that slice of each of the
// group's k-tiles, and then of each n-tile that keeps a tile in the group, is packed into a
// contiguous buffer (x's and dY's row strides, multiples of 4 KiB for common widths, would make
// their rows evict each other from cache), so each slice of dY is packed once per group, and
// every kept tile of the group accumulates over the slices; stores go through the mask. The other
// tiles are zero-filled.
constexpr int64_t kDwRows = 256;
constexpr int64_t kDwColumns = 8;  // x slices of a group: kDwColumns * kDwRows * kTile floats, in L2

at::Tensor tile_gemm_grad_weight(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& words,
                                 const TileGrid& g) {
  const int64_t M = x.size(0), N = grad.size(1), K = x.size(1);
  const int64_t words_per_row = (K + 31) / 32;
  at::Tensor dw = at::empty({N, K}, x.options());
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int32_t* wd = words.data_ptr<int32_t>();
  float* dwp = dw.data_ptr<float>();
  const KeptLists cols = kept_lists(g, /*by_n=*/false);
  std::vector<int64_t> prefix_cost(g.tiles_k + 1, 0);  // a column's cost: its kept tiles, and 1 to zero-fill
  for (int64_t k = 0; k < g.tiles_k; ++k) prefix_cost[k + 1] = prefix_cost[k] + 1 + cols.ptr[k + 1] - cols.ptr[k];
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), g.tiles_k);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> x_slices(kDwColumns * kDwRows * kTile), dy_slice(kDwRows * kTile);
    for (int64_t part = part_begin; part < part_end; ++part) {
      const auto [k_begin, k_end] = cost_range(prefix_cost, part, parts);
      for (int64_t k = k_begin; k < k_end; ++k) {
        for (int64_t n = 0; n < g.tiles_n; ++n) {
          if (g.is_kept(n, k)) continue;
          for (int64_t r = n * kTile; r < n * kTile + tile_extent(N, n); ++r) {
            std::memset(dwp + r * K + k * kTile, 0, tile_extent(K, k) * sizeof(float));
          }
        }
      }
      for (int64_t group = k_begin; group < k_end; group += kDwColumns) {
        const int64_t group_end = std::min(k_end, group + kDwColumns);
        for (int64_t m0 = 0; m0 < std::max<int64_t>(M, 1); m0 += kDwRows) {
          const int64_t rows = std::min(kDwRows, M - m0);
          for (int64_t k = group; k < group_end; ++k) {
            if (cols.ptr[k] == cols.ptr[k + 1]) continue;
            float* dst = x_slices.data() + (k - group) * kDwRows * kTile;
            for (int64_t m = 0; m < rows; ++m) {
              std::memcpy(dst + m * kTile, xp + (m0 + m) * K + k * kTile, tile_extent(K, k) * sizeof(float));
            }
          }
          for (int64_t n = 0; n < g.tiles_n; ++n) {
            bool packed = false;
            for (int64_t k = group; k < group_end; ++k) {
              if (!g.is_kept(n, k)) continue;
              if (!packed) {
                for (int64_t m = 0; m < rows; ++m) {
                  std::memcpy(dy_slice.data() + m * kTile, gp + (m0 + m) * N + n * kTile,
                              tile_extent(N, n) * sizeof(float));
                }
                packed = true;
              }
              const tile_gemm::Segment seg{0, x_slices.data() + (k - group) * kDwRows * kTile, rows};
              tile_gemm::Panel p{dy_slice.data(), 1, kTile, &seg, 1, kTile, dwp + n * kTile * K + k * kTile, K,
                                 tile_extent(K, k), nullptr, wd + n * kTile * words_per_row + k * kTileWords,
                                 words_per_row};
              p.accumulate = m0 > 0;
              tile_gemm::panel_rows(p, 0, tile_extent(N, n));
            }
          }
        }
      }
    }
  });
  return dw;
}

at::Tensor masked_linear_forward(const at::Tensor& x2d, const at::Tensor& weight,
                                 const at::Tensor& words, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& tile_kept) {
  const at::Tensor wc = weight.contiguous();
  check_words(wc, words);
  check_operands(x2d, wc, nullptr, bias);
  const bool tiled = tile_kept.has_value();
  const TileGrid grid = tiled ? tile_grid(*tile_kept, wc) : TileGrid();
  if (use_few_rows(x2d, {x2d, wc, bias.value_or(wc)})) {
    return few_rows_forward(x2d.contiguous(), wc, words, bias, tiled ? &grid : nullptr);
  }
  if (!tiled) {
    const at::Tensor w = masked(wc, words, /*in_place=*/false);
    return bias.has_value() ? at::addmm(*bias, x2d, w.t()) : at::mm(x2d, w.t());
  }
  if (use_tile_gemm({x2d, wc, bias.value_or(wc)})) return tile_gemm_forward(x2d.contiguous(), wc, words, bias, grid);
  const at::Tensor w = masked(wc, words, false, &grid);
  const int64_t M = x2d.size(0), N = wc.size(0);
  // a copy, always: with one row, expand() is already contiguous and would alias the bias
  at::Tensor y = bias.has_value() ? bias->expand({M, N}).clone(at::MemoryFormat::Contiguous)
                                  : at::zeros({M, N}, x2d.options());
  // threads own whole n-tiles (output columns); each small matmul runs single-threaded
  at::parallel_for(0, grid.tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      at::Tensor y_n = tile_cols(y, n);
      const at::Tensor w_n = tile_rows(w, n);
      for_each_run(grid, n, /*along_k=*/true, [&](int64_t k, int64_t count) {
        y_n.addmm_(tile_span(x2d, 1, k, count), tile_span(w_n, 1, k, count).t());
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& grad2d,
                                                          const at::Tensor& x2d,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& words,
                                                          bool needs_input, bool needs_weight,
                                                          const std::optional<at::Tensor>& tile_kept) {
  const at::Tensor wc = weight.contiguous();
  check_words(wc, words);
  check_operands(x2d, wc, &grad2d, std::nullopt);
  const bool tiled = tile_kept.has_value();
  const TileGrid grid = tiled ? tile_grid(*tile_kept, wc) : TileGrid();
  at::Tensor dx, dw;
  if (use_few_rows(grad2d, {grad2d, x2d, wc})) {
    const TileGrid* kept = tiled ? &grid : nullptr;
    if (needs_input) dx = few_rows_grad_input(grad2d.contiguous(), wc, words, kept);
    if (needs_weight) dw = few_rows_grad_weight(grad2d.contiguous(), x2d.contiguous(), words, kept);
  }
  if (tiled && use_tile_gemm({grad2d, x2d, wc})) {
    if (needs_input && !dx.defined()) dx = tile_gemm_grad_input(grad2d.contiguous(), wc, words, grid);
    if (needs_weight && !dw.defined()) dw = tile_gemm_grad_weight(grad2d.contiguous(), x2d.contiguous(), words, grid);
  }
  if (needs_input && !tiled && !dx.defined()) dx = at::mm(grad2d, masked(wc, words, false));
  if (needs_input && tiled && !dx.defined()) {
    const at::Tensor w = masked(wc, words, false, &grid);
    dx = at::zeros_like(x2d);
    at::parallel_for(0, grid.tiles_k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        at::Tensor dx_k = tile_cols(dx, k);
        const at::Tensor w_k = tile_cols(w, k);
        for_each_run(grid, k, /*along_k=*/false, [&](int64_t n, int64_t count) {
          dx_k.addmm_(tile_span(grad2d, 1, n, count), tile_span(w_k, 0, n, count));
        });
      }
    });
  }
  if (needs_weight && !tiled && !dw.defined()) dw = masked(at::mm(grad2d.t(), x2d).contiguous(), words, /*in_place=*/true);
  if (needs_weight && tiled && !dw.defined()) {
    dw = at::zeros_like(wc);
    at::parallel_for(0, grid.tiles_n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const at::Tensor g_n = tile_cols(grad2d, n).t();
        at::Tensor dw_n = tile_rows(dw, n);
        for_each_run(grid, n, /*along_k=*/true, [&](int64_t k, int64_t count) {
          tile_span(dw_n, 1, k, count).addmm_(g_n, tile_span(x2d, 1, k, count));
        });
      }
    });
    masked(dw, words, /*in_place=*/true, &grid);  // partial tiles: exactly 0 where pruned
  }
  if (!dx.defined()) dx = at::empty({0}, x2d.options());
  if (!dw.defined()) dw = at::empty({0}, weight.options());
  return {dx, dw};
}

}  // namespace

// Which kernel multiplies the kept tiles of fp32 here: "avx512" (tile_gemm) or "aten".
std::string masked_linear_tile_kernel() { return tile_gemm_enabled() ? "avx512" : "aten"; }

TORCH_LIBRARY_FRAGMENT(dsd_kernels_cpp, m) {
  m.def(dsd_kernels_schemas::kMaskedLinearTileKernel, &masked_linear_tile_kernel);
}

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("masked_linear_forward", &masked_linear_forward);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

}  // namespace dsd_kernels_cpu
