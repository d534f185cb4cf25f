// tile_gemm's kernels (isa_kernels.h), written once with at::vec::Vectorized<float>: included by
// each per-ISA source after it has set CPU_CAPABILITY and the compiler's target. The register tile
// is kRows rows x kVecs vectors: 6 x 2 on 8-lane ISAs (12 of AVX2's 16 registers accumulate), 6 x 4
// with AVX-512 (24 of 32). Every output element is one chain of fused multiply-adds over the
// segments in order, k ascending, from the bias or 0: the same bits on every ISA with FMA.
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_lanes.h"

namespace dsd_kernels_cpu {
namespace isa {
namespace CPU_CAPABILITY {
namespace {

using tile_gemm::kTile;
using tile_gemm::Panel;

constexpr int kVecs = kLanes >= 16 ? 4 : 2;
constexpr int kChunk = kLanes * kVecs;  // columns of the register tile
static_assert(kTile % kChunk == 0, "a register tile divides a tile");

// columns [c0, c0 + kChunk) of rows [r0, r0 + MR) of the panel's tile
template <int MR>
inline void register_tile(const Panel& p, int64_t r0, int64_t c0) {
  int64_t n[kVecs];  // columns of each vector inside the tile's `cols`
  for (int j = 0; j < kVecs; ++j) n[j] = std::clamp<int64_t>(p.cols - c0 - j * kLanes, 0, kLanes);
  Vec acc[MR][kVecs];
  #pragma GCC unroll 8
  for (int j = 0; j < kVecs; ++j) {
    const Vec init = p.init ? load_first(p.init + c0 + j * kLanes, n[j]) : Vec(0.0f);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      acc[r][j] = p.accumulate ? load_first(p.c + (r0 + r) * p.c_rs + c0 + j * kLanes, n[j]) : init;
    }
  }
  for (int64_t s = 0; s < p.num_segs; ++s) {
    const tile_gemm::Segment seg = p.segs[s];
    const float* a = p.a + r0 * p.a_rs + seg.a_off * p.a_ks;
    const float* b = seg.b + c0;  // packed with kTile columns: whole vectors, zeros past `cols`
    for (int64_t k = 0; k < seg.kc; ++k, a += p.a_ks, b += p.b_ks) {
      Vec bv[kVecs];
      #pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) bv[j] = Vec::loadu(b + j * kLanes);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Vec av(a[r * p.a_rs]);
        #pragma GCC unroll 8
        for (int j = 0; j < kVecs; ++j) acc[r][j] = at::vec::fmadd(av, bv[j], acc[r][j]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* c = p.c + (r0 + r) * p.c_rs + c0;
    #pragma GCC unroll 8
    for (int j = 0; j < kVecs; ++j) {
      Vec v = acc[r][j];
      if (p.keep_words) v = v & keep_lanes(keep_bits(p.keep_words + (r0 + r) * p.words_rs, c0 + j * kLanes));
      store_first(v, c + j * kLanes, n[j]);
    }
  }
}

}  // namespace

void tile_panel_rows(const Panel& p, int64_t r_begin, int64_t r_end) {
  constexpr int64_t kRows = tile_gemm::kRows;
  for (int64_t r = r_begin; r < r_end; r += kRows) {
    for (int64_t c0 = 0; c0 < std::min<int64_t>(p.cols, kTile); c0 += kChunk) {
      switch (std::min<int64_t>(kRows, r_end - r)) {
        case 6: register_tile<6>(p, r, c0); break;
        case 5: register_tile<5>(p, r, c0); break;
        case 4: register_tile<4>(p, r, c0); break;
        case 3: register_tile<3>(p, r, c0); break;
        case 2: register_tile<2>(p, r, c0); break;
        default: register_tile<1>(p, r, c0); break;
      }
    }
  }
}

void pack_tile(const float* w, const int32_t* words, int64_t words_per_row, int64_t cols_total, int64_t r0,
               int64_t rows, int64_t c0, int64_t cols, bool transposed, float* dst) {
  alignas(64) float tile[kTile * kTile];
  float* out = transposed ? tile : dst;
  for (int64_t r = 0; r < kTile; ++r) {
    for (int64_t c = 0; c < kTile; c += kLanes) {
      const int64_t n = r < rows ? std::clamp<int64_t>(cols - c, 0, kLanes) : 0;
      Vec v(0.0f);
      if (n > 0) {
        v = load_first(w + (r0 + r) * cols_total + c0 + c, n) &
            keep_lanes(keep_bits(words + (r0 + r) * words_per_row, c0 + c));
      }
      v.store(out + r * kTile + c);
    }
  }
  if (!transposed) return;
  for (int64_t i = 0; i < kTile; ++i) {
    for (int64_t j = 0; j < kTile; ++j) dst[j * kTile + i] = tile[i * kTile + j];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace isa
}  // namespace dsd_kernels_cpu
