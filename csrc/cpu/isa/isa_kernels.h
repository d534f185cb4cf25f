// The CPU kernels written once with ATen's at::vec::Vectorized and compiled once per vector ISA
// (default.cpp, avx2.cpp, avx512.cpp in this folder); cpu_capability() picks which runs. Plain
// C++ (no ATen): this interface is shared by code compiled for the baseline ISA and for each
// capability, so nothing inline here may differ between them.
#pragma once
#include <cstdint>

namespace dsd_kernels_cpu {

// ---------------------------------------------------------------- tile_gemm (masked_linear)
// C[r, 0:cols] = init + sum over segments s, k < s.kc of A[r, s.a_off + k] * s.b[k * b_ks + 0:cols]
// for the rows r of one output tile (cols <= kTile), A read through strides (a_rs, a_ks) so that
// x, dY and dY^T are used where they lie; B is packed, kTile floats per row (zero-padded).
namespace tile_gemm {

constexpr int64_t kTile = 64;  // tile rows and columns (tile_structure.TILE)
constexpr int kRows = 6;       // rows of the register tile

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

}  // namespace tile_gemm

// ---------------------------------------------------------------- few rows (masked_linear)
// The products of masked_linear_few_rows.cpp for batches of at most kMaxRows rows.
namespace few_rows {

constexpr int64_t kTile = tile_gemm::kTile;
constexpr int kMaxRows = 4;  // masked_linear.h kFewRows

struct Problem {
  const float* w;             // W (N, K), row-major
  const int32_t* words;       // its mask words, words_per_row per row
  int64_t words_per_row, N, K;
  const int32_t* kept_tiles;  // the kept-tile table (tiles_k per row of tiles), or nullptr: every tile
  int64_t tiles_k;
};

}  // namespace few_rows

namespace isa {

// One row's elements [0, n) of a masked SGD step in fp32 (words: the row's mask words; b: the
// momentum buffer, or nullptr without momentum); the hyper-parameters as torch passes them to its
// fp32 step (alphas as floats).
struct SgdRow {
  float* p;
  const float* g;
  float* b;
  const int32_t* words;
  int64_t n;
  float lr, momentum, dampening, weight_decay, momentum_alpha;
  bool first, nesterov, maximize, decay;
};

// A range of a masked AdamW step in fp32 (masked_adamw.cpp) over elements [0, n) of whole mask
// words: element e's keep bit is bit e % 32 of words[e / 32] (words: nullptr, all kept). The
// coefficients as masked_adamw.cpp's Coefficients<float>.
struct AdamwSpan {
  float* p;
  const float* g;
  float* m;
  float* v;
  float* vmax;  // the amsgrad maximum, or nullptr without amsgrad
  const int32_t* words;
  int64_t n;
  float decay, avg_weight, avg_keep, beta2, sq_weight, neg_step, bc2_sqrt, eps;
  bool apply_decay, maximize, small_weight;
};

#define DSD_ISA_KERNELS                                                                          \
  /* whether this ISA's kernels were compiled (else the functions below must not be called) */  \
  bool built();                                                                                  \
  /* rows [r_begin, r_end) of the panel's output tile */                                         \
  void tile_panel_rows(const tile_gemm::Panel& p, int64_t r_begin, int64_t r_end);               \
  /* dst (kTile x kTile, row-major) = the tile of W*M (W: `cols_total` columns, mask words      \
     `words_per_row` per row) at rows [r0, r0 + rows), columns [c0, c0 + cols), zero-padded;    \
     transposed: dst[col][row] */                                                                \
  void pack_tile(const float* w, const int32_t* words, int64_t words_per_row, int64_t cols_total, \
                 int64_t r0, int64_t rows, int64_t c0, int64_t cols, bool transposed, float* dst);          \
  /* data[0, n) = exactly +0 where the mask bits (words[j / 32] bit j % 32) are clear: the        \
     re-masking pass (apply_masks) of a row of fp32 */                                            \
  void zero_pruned_fp32(float* data, const int32_t* words, int64_t n);                           \
  /* the masked SGD step of one row of fp32 (masked_sgd.cpp); FMA ISAs only: the default        \
     build has no FMA and would round twice */                                                   \
  void masked_sgd_fp32(const SgdRow& row);                                                      \
  /* masked AdamW with torch's single-tensor/foreach rounding, in two phases around the caller's \
     square root (torch's own sqrt routine): phase 1 writes the new exp_avg_sq to s[0, n) and,   \
     with amsgrad, the new maximum to second[0, n); phase 2, given root[0, n) = sqrt(second or   \
     s), writes the weight and moments; entries of words that keep nothing are left unwritten   \
     in s and second. FMA ISAs only, as masked_sgd_fp32 */                                     \
  void adamw_second_moments_fp32(const AdamwSpan& a, float* s, float* second);                  \
  void adamw_update_fp32(const AdamwSpan& a, const float* s, const float* second, const float* root); \
  /* masked AdamW with the rounding of the vector loop of torch's fused CPU kernel (the IEEE     \
     square root) in one pass; FMA ISAs only */                                                 \
  void adamw_fused_fp32(const AdamwSpan& a);                                                   \
  /* the selection's bracket pass over fp32 data[0, count) (selection.h gather_bracket): keys  \
     (|v| as bits, NaN clamped to one key) under lo added to *below, those with key - lo <=     \
     width appended to out in order (out has room for count + 8); returns how many */           \
  int64_t bracket_chunk_fp32(const float* data, int64_t count, uint32_t lo, uint32_t width,      \
                             int64_t* below, uint32_t* out);                                    \
  /* mask_update's split of n consecutive 32-bit elements under mask words (bit j of words[j /  \
     32]): kept_from's at set bits to kept_out, pruned_from's at clear ones to pruned_out, in   \
     order; nothing is written past kept_room / pruned_room entries */                          \
  void split_by_mask32(const uint32_t* kept_from, const uint32_t* pruned_from, const int32_t* words, \
                       int64_t n, uint32_t* kept_out, int64_t kept_room, uint32_t* pruned_out,  \
                       int64_t pruned_room);                                                    \
  /* the sharded selection's classify pass (sharded_bracket.cpp) over `count` whole mask words \
     of fp32 values at src (32 a word): words[w] = the bits of keys > hi; the keys in [lo, hi] \
     and their offsets from src stored in order (packed: (key - lo) << 12 | offset in keys,     \
     offsets unused; room for 32 * count + 16 of each); keys under lo added to *under; returns  \
     how many were stored */                                                                    \
  int64_t classify_words_fp32(const float* src, int64_t count, uint32_t lo, uint32_t hi, bool packed, \
                              int32_t* words, uint32_t* keys, int32_t* offsets, int64_t* under);    \
  /* the resolve pass's split (sharded_resolve.cpp) of 32-bit keys: the positions of the keys  \
     above hi to above[], the indices of those in [lo, hi] to inside[], in order (room for      \
     count + 16 of each) */                                                                     \
  void split_keys32(const int32_t* key, const int32_t* pos, int64_t count, uint32_t lo, uint32_t hi,  \
                    int32_t* above, int64_t* num_above, int32_t* inside, int64_t* num_inside);  \
  /* the selection's mask pass (selection.h write_mask): out[w] = the bits of the keys of the   \
     fp32 values src[32 w, 32 w + 32) above t, for w in [0, words); t below the NaN key */       \
  void above_words_fp32(const float* src, int64_t words, uint32_t t, int32_t* out);            \
  /* before[w] = start + the set bits of words[0, w), for w in [0, n] */                        \
  void popcount_scan(const int32_t* words, int64_t n, int64_t start, int64_t* before);         \
  /* few rows (rows <= few_rows::kMaxRows, contiguous): y[m, n] = x[m, :] . (W*M)[n, :] + bias[n] \
     (bias: nullptr, 0) for rows n in [n_begin, n_end), n_begin even */                         \
  void few_rows_forward(const few_rows::Problem& pb, int rows, const float* x, const float* bias, float* y, \
                        int64_t n_begin, int64_t n_end);                                        \
  /* dx[m, :] += sum over n in [n_begin, n_end) of dy[m, n] (W*M)[n, :]; n_begin a multiple of 4 */ \
  void few_rows_grad_input(const few_rows::Problem& pb, int rows, const float* dy, float* dx, int64_t n_begin, \
                           int64_t n_end);                                                      \
  /* dw[n, :] = (sum over m of dy[m, n] x[m, :]) where kept, exactly +0 where pruned */         \
  void few_rows_grad_weight(const few_rows::Problem& pb, int rows, const float* dy, const float* x, float* dw, \
                            int64_t n_begin, int64_t n_end);                                    \
  /* out[0, words) = the 2:4 keep-words of the fp32 values w[0, 32 x words) (nm_masks.cpp) */   \
  void words_2_4_fp32(const float* w, int32_t* out, int64_t words);

namespace DEFAULT { DSD_ISA_KERNELS }
namespace AVX2 { DSD_ISA_KERNELS }
namespace AVX512 { DSD_ISA_KERNELS }
#undef DSD_ISA_KERNELS

}  // namespace isa
}  // namespace dsd_kernels_cpu
