// masked_linear on CPU: the mask is applied straight from the packed words (no unpacked copy of
// the mask is kept), in parallel.
//
// Without `tile_kept`: one ATen matmul (MKL/oneDNN) on W*M, the mask applied to W before the
// forward and dX matmuls and to dW after its matmul; batches of a few rows take
// masked_linear_few_rows.cpp's kernels where they run.
//
// With `tile_kept` (the (kTile x kTile) tiles of the mask that keep anything, from
// tile_structure.py, which also decides when skipping pays) only kept tiles are multiplied, two ways:
// - fp32 where tile_gemm_enabled(): masked_linear_tiles.cpp, the register-tiled kernel of
//   csrc/cpu/isa compiled for the ISA cpu_capability() picks (AVX-512, AVX2; the portable build on
//   request).
// - otherwise one ATen matmul per run of adjacent kept tiles along the reduced dimension, on strided
//   views (no copies), threads splitting the output tiles.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "../op_args.h"
#include "../op_schemas.h"
#include "common.h"
#include "cpu_capability.h"
#include "masked_linear.h"

namespace dsd_kernels_cpu {
namespace masked_linear {

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

namespace {

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
    // with tiles, dX takes tile_gemm below unless the AVX-512 loop runs: on AVX2 the portable
    // few-rows loop measured slower than tile_gemm for tiled dX (the forward and dW faster)
    if (needs_input && (!tiled || cpu_has_avx512f())) dx = few_rows_grad_input(grad2d.contiguous(), wc, words, kept);
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

}  // namespace masked_linear

// Which kernel multiplies the kept tiles of fp32 here: the ISA of tile_gemm ("avx512", "avx2",
// "default") or "aten".
std::string masked_linear_tile_kernel() {
  return masked_linear::tile_gemm_enabled() ? capability_name(cpu_capability()) : "aten";
}

TORCH_LIBRARY_FRAGMENT(dsd_kernels_cpp, m) {
  m.def(dsd_kernels_schemas::kMaskedLinearTileKernel, &masked_linear_tile_kernel);
}

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("masked_linear_forward", &masked_linear::masked_linear_forward);
  m.impl("masked_linear_backward", &masked_linear::masked_linear_backward);
}

}  // namespace dsd_kernels_cpu
