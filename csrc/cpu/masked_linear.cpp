// masked_linear on CPU: the matmuls are ATen's (MKL/oneDNN); the mask is applied straight
// from the packed words (no unpacked copy of the mask is kept), in parallel, to W before
// the forward and dX matmuls and to dW after its matmul.
//
// Tile skipping: when at most `blocked_max_kept` of the (kTile x kTile) tiles of the mask keep
// anything (block pruning; the rule of tile_structure.py), the matmuls run tile by tile over the
// kept tiles only, threads splitting the output tiles, and W*M is only formed inside kept tiles.
// Otherwise one dense matmul on W*M is faster.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dsd_kernels_cpu {
namespace {

constexpr int64_t kTile = 64;                // tile rows and columns (tile_structure.TILE)
constexpr int64_t kTileWords = kTile / 32;  // mask words per tile row

// Which tiles keep anything: kept[n * tiles_k + k]. A tile's scan stops at its first non-zero
// word, and the whole scan stops once more than `max_kept` tiles are kept (the dense path will
// run), so an unstructured mask costs about one word per tile.
struct TileGrid {
  int64_t tiles_n = 0, tiles_k = 0, count = 0;
  std::vector<uint8_t> kept;
  bool is_kept(int64_t n, int64_t k) const { return kept[n * tiles_k + k] != 0; }
};

TileGrid tile_grid(const int32_t* words, const MaskLayout& lay, int64_t max_kept) {
  TileGrid g;
  g.tiles_n = (lay.rows + kTile - 1) / kTile;
  g.tiles_k = (lay.cols + kTile - 1) / kTile;
  g.kept.assign(g.tiles_n * g.tiles_k, 0);
  for (int64_t n = 0; n < g.tiles_n && g.count <= max_kept; ++n) {
    const int64_t r_end = std::min(lay.rows, (n + 1) * kTile);
    for (int64_t k = 0; k < g.tiles_k; ++k) {
      const int64_t i_begin = k * kTileWords, i_end = std::min(lay.words_per_row, (k + 1) * kTileWords);
      bool any = false;
      for (int64_t r = n * kTile; r < r_end && !any; ++r) {
        for (int64_t i = i_begin; i < i_end; ++i) any |= words[r * lay.words_per_row + i] != 0;
      }
      g.kept[n * g.tiles_k + k] = any;
      g.count += any;
    }
  }
  return g;
}

at::Tensor check_words(const at::Tensor& t, const at::Tensor& words) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "masked_linear: weights must be contiguous 2-D");
  TORCH_CHECK(words.scalar_type() == at::kInt && words.is_contiguous() &&
                  words.numel() == MaskLayout(t).num_words(),
              "masked_linear: mask_words do not fit a weight of shape ", t.sizes());
  return words;
}

// W*M (out of place, or in place on t). With `grid`, only inside kept tiles: the rest of the
// result is left unwritten, and the tiled matmuls never read it.
at::Tensor masked(const at::Tensor& t, const at::Tensor& words, bool in_place,
                  const TileGrid* grid = nullptr) {
  check_words(t, words);
  const MaskLayout lay(t);
  at::Tensor out = in_place ? t : at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "masked_linear", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int32_t* w = words.data_ptr<int32_t>();
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

// The tile grid when tile skipping pays (at most blocked_max_kept of the tiles kept), else none.
bool sparse_tiles(const at::Tensor& weight, const at::Tensor& words, double blocked_max_kept,
                  TileGrid* grid) {
  check_words(weight, words);
  const MaskLayout lay(weight);
  const int64_t tiles = ((lay.rows + kTile - 1) / kTile) * ((lay.cols + kTile - 1) / kTile);
  const auto max_kept = static_cast<int64_t>(blocked_max_kept * static_cast<double>(tiles));
  *grid = tile_grid(words.data_ptr<int32_t>(), lay, max_kept);
  return tiles > 0 && grid->count <= max_kept;
}

inline at::Tensor tile_cols(const at::Tensor& t, int64_t tile) {
  return t.narrow(1, tile * kTile, std::min(kTile, t.size(1) - tile * kTile));
}
inline at::Tensor tile_rows(const at::Tensor& t, int64_t tile) {
  return t.narrow(0, tile * kTile, std::min(kTile, t.size(0) - tile * kTile));
}

at::Tensor masked_linear_forward(const at::Tensor& x2d, const at::Tensor& weight,
                                 const at::Tensor& words, const std::optional<at::Tensor>& bias,
                                 double blocked_max_kept) {
  const at::Tensor wc = weight.contiguous();
  TileGrid grid;
  if (!sparse_tiles(wc, words, blocked_max_kept, &grid)) {
    const at::Tensor w = masked(wc, words, /*in_place=*/false);
    return bias.has_value() ? at::addmm(*bias, x2d, w.t()) : at::mm(x2d, w.t());
  }
  const at::Tensor w = masked(wc, words, false, &grid);
  const int64_t M = x2d.size(0), N = wc.size(0);
  at::Tensor y = bias.has_value() ? bias->expand({M, N}).contiguous() : at::zeros({M, N}, x2d.options());
  // threads own whole n-tiles (output columns); each small matmul runs single-threaded
  at::parallel_for(0, grid.tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      at::Tensor y_n = tile_cols(y, n);
      const at::Tensor w_n = tile_rows(w, n);
      for (int64_t k = 0; k < grid.tiles_k; ++k) {
        if (grid.is_kept(n, k)) y_n.addmm_(tile_cols(x2d, k), tile_cols(w_n, k).t());
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& grad2d,
                                                          const at::Tensor& x2d,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& words,
                                                          bool needs_input, bool needs_weight,
                                                          double blocked_max_kept) {
  const at::Tensor wc = weight.contiguous();
  TileGrid grid;
  const bool tiled = sparse_tiles(wc, words, blocked_max_kept, &grid);
  at::Tensor dx, dw;
  if (needs_input && !tiled) dx = at::mm(grad2d, masked(wc, words, false));
  if (needs_input && tiled) {
    const at::Tensor w = masked(wc, words, false, &grid);
    dx = at::zeros_like(x2d);
    at::parallel_for(0, grid.tiles_k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        at::Tensor dx_k = tile_cols(dx, k);
        for (int64_t n = 0; n < grid.tiles_n; ++n) {
          if (grid.is_kept(n, k)) dx_k.addmm_(tile_cols(grad2d, n), tile_cols(tile_rows(w, n), k));
        }
      }
    });
  }
  if (needs_weight && !tiled) dw = masked(at::mm(grad2d.t(), x2d).contiguous(), words, /*in_place=*/true);
  if (needs_weight && tiled) {
    dw = at::zeros_like(wc);
    at::parallel_for(0, grid.tiles_n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const at::Tensor g_n = tile_cols(grad2d, n).t();
        at::Tensor dw_n = tile_rows(dw, n);
        for (int64_t k = 0; k < grid.tiles_k; ++k) {
          if (grid.is_kept(n, k)) tile_cols(dw_n, k).addmm_(g_n, tile_cols(x2d, k));
        }
      }
    });
    masked(dw, words, /*in_place=*/true, &grid);  // partial tiles: exactly 0 where pruned
  }
  if (!dx.defined()) dx = at::empty({0}, x2d.options());
  if (!dw.defined()) dw = at::empty({0}, weight.options());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("masked_linear_forward", &masked_linear_forward);
  m.impl("masked_linear_backward", &masked_linear_backward);
}

}  // namespace dsd_kernels_cpu
