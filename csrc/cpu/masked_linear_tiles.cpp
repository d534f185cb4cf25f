// masked_linear's kept tiles of fp32 through tile_gemm (csrc/cpu/isa, the ISA cpu_capability()
// picks), which reads x, dY and the kept tiles of W*M (packed per call, mask applied while
// packing) and writes every output element once: no zero-fill pass, no read-modify-write of the
// output per tile, no per-tile matmul call.
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_capability.h"
#include "masked_linear.h"

namespace dsd_kernels_cpu {
namespace masked_linear {

bool tile_gemm_enabled() {
  const char* env = std::getenv("DSD_KERNELS_TILE_GEMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return cpu_capability() != CpuCapability::kDefault;
}

bool use_tile_gemm(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.scalar_type() != at::kFloat) return false;
  }
  return tile_gemm_enabled();
}

namespace {

// the ISA's tile_gemm functions, chosen once per call
struct TileKernels {
  decltype(&isa::DEFAULT::tile_panel_rows) panel_rows;
  decltype(&isa::DEFAULT::pack_tile) pack_tile;
};

TileKernels tile_kernels() {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512: return {&isa::AVX512::tile_panel_rows, &isa::AVX512::pack_tile};
    case CpuCapability::kAvx2: return {&isa::AVX2::tile_panel_rows, &isa::AVX2::pack_tile};
    default: return {&isa::DEFAULT::tile_panel_rows, &isa::DEFAULT::pack_tile};
  }
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
                                                                  const KeptLists& lists, bool by_n,
                                                                  const TileKernels& kernels) {
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
        kernels.pack_tile(wp, wd, lay.words_per_row, lay.cols, n * kTile, tile_extent(N, n), k * kTile,
                          tile_extent(K, k), /*transposed=*/by_n, pk + i * kTile * kTile);
      }
    }
  });
  return {packed, std::move(segs)};
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

}  // namespace

// y (M, N) = x (M, K) (W*M)^T + bias over the kept tiles; every element of y written once.
at::Tensor tile_gemm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& words,
                             const std::optional<at::Tensor>& bias, const TileGrid& g) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const KeptLists lists = kept_lists(g, /*by_n=*/true);
  const TileKernels kernels = tile_kernels();
  const auto [packed, segs] = pack_kept(w, words, lists, /*by_n=*/true, kernels);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(M, g.tiles_n, K * 4, [&](int64_t n, int64_t r0, int64_t r1) {
    const tile_gemm::Panel p{xp, K, 1, segs.data() + lists.ptr[n], lists.ptr[n + 1] - lists.ptr[n], kTile,
                             yp + n * kTile, N, tile_extent(N, n),
                             b.defined() ? b.data_ptr<float>() + n * kTile : nullptr, nullptr, 0};
    kernels.panel_rows(p, r0, r1);
  });
  return y;
}

// dX (M, K) = dY (M, N) (W*M) over the kept tiles; every element of dX written once.
at::Tensor tile_gemm_grad_input(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& words,
                                const TileGrid& g) {
  const int64_t M = grad.size(0), N = w.size(0), K = w.size(1);
  const KeptLists lists = kept_lists(g, /*by_n=*/false);
  const TileKernels kernels = tile_kernels();
  const auto [packed, segs] = pack_kept(w, words, lists, /*by_n=*/false, kernels);
  at::Tensor dx = at::empty({M, K}, grad.options());
  const float* gp = grad.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  for_row_chunks(M, g.tiles_k, N * 4, [&](int64_t k, int64_t r0, int64_t r1) {
    const tile_gemm::Panel p{gp, N, 1, segs.data() + lists.ptr[k], lists.ptr[k + 1] - lists.ptr[k], kTile,
                             dxp + k * kTile, K, tile_extent(K, k), nullptr, nullptr, 0};
    kernels.panel_rows(p, r0, r1);
  });
  return dx;
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
  const TileKernels kernels = tile_kernels();
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
              kernels.panel_rows(p, 0, tile_extent(N, n));
            }
          }
        }
      }
    }
  });
  return dw;
}

}  // namespace masked_linear
}  // namespace dsd_kernels_cpu
