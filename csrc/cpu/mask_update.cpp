// RigL/SET's mask update on CPU (dsd_kernels/backends/cpp/mask_update.py), one tensor at a time:
//
// The split (mask_subsets, also an op of its own): the values of `kept_from` (the weights) at the
// mask's kept entries and those of `pruned_from` (the scores) at its pruned entries, each in flat
// order (so the selection's tie rule, lower index first, is the tensor's own). One read of both
// tensors, in parallel over runs of mask words whose elements follow each other: a word's offsets
// come from a scan of the words' popcounts (its pruned offset is the elements before it minus the
// kept ones), and the vector kernel (isa/compress_kernel.h) writes exactly its run's part.
//
// The selections: the exact magnitude selection (local_select.h) over each subset, its words
// written as the local op writes masks (selection.h write_mask).
//
// The new words (update_one below), from the two selections' packed bits.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../op_args.h"
#include "common.h"
#include "local_select.h"

namespace dsd_kernels_cpu {
namespace {

// set bits per byte value: the portable baseline build has no POPCNT instruction
struct ByteCounts {
  uint8_t count[256];
  constexpr ByteCounts() : count() {
    for (int b = 0; b < 256; ++b) count[b] = static_cast<uint8_t>((b & 1) + (b >> 1 & 1) + (b >> 2 & 1) + (b >> 3 & 1) +
                                                                  (b >> 4 & 1) + (b >> 5 & 1) + (b >> 6 & 1) + (b >> 7 & 1));
  }
};
inline constexpr ByteCounts kByteCounts{};

// kept_before[w]: kept entries of the words before word w, flat order (num_words + 1 entries).
std::vector<int64_t> kept_offsets(const MaskLayout& lay, const int32_t* words) {
  std::vector<int64_t> before(static_cast<size_t>(lay.num_words()) + 1, 0);
  DSD_ISA_KERNEL(popcount_scan)(words, lay.num_words(), 0, before.data());
  return before;
}

inline uint32_t valid_bits(int64_t len) { return len >= 32 ? 0xFFFFFFFFu : ((1u << len) - 1u); }

// positions[b][j]: the j-th set bit of byte b (0 past its popcount: a valid position to read)
struct BytePositions {
  uint8_t at[256][8];
  uint8_t count[256];
  BytePositions() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int j = 0; j < 8; ++j) {
        at[b][j] = 0;
        if (b >> j & 1) at[b][n++] = static_cast<uint8_t>(j);
      }
      count[b] = static_cast<uint8_t>(n);
    }
  }
};

const BytePositions& byte_positions() {
  static const BytePositions table;
  return table;
}

// The values of `from` at the set bits of `bits` (positions < len), appended at buf[n...]; 8
// copies per byte, so buf has 8 entries of slack.
template <typename value_t>
inline int left_pack(const value_t* from, uint32_t bits, int64_t len, value_t* buf, const BytePositions& pos) {
  int n = 0;
  for (int byte = 0; 8 * byte < len; ++byte) {
    const uint32_t b = (bits >> (8 * byte)) & 0xFFu;
    const value_t* src = from + 8 * byte;
    for (int j = 0; j < 8; ++j) buf[n + j] = src[pos.at[b][j]];
    n += pos.count[b];
  }
  return n;
}

template <typename kept_t, typename pruned_t>
void compact(const MaskLayout& lay, const int32_t* words, const std::vector<int64_t>& kept_before,
             const kept_t* kept_from, const pruned_t* pruned_from, kept_t* kept_out, pruned_t* pruned_out) {
  if constexpr (sizeof(kept_t) == 4 && sizeof(pruned_t) == 4) {
    // runs of words whose elements follow each other (a thread's range of whole-word rows, else
    // one row), each split by the vector kernel into exactly its own part of both outputs
    const auto split = DSD_ISA_KERNEL(split_by_mask32);
    const auto run = [&](int64_t w0, int64_t w1, int64_t base, int64_t n) {
      const int64_t ko = kept_before[w0], kn = kept_before[w1] - ko;
      split(kept_from + base, pruned_from + base, words + w0, n, kept_out + ko, kn, pruned_out + (base - ko), n - kn);
    };
    if (lay.cols % 32 == 0) {
      at::parallel_for(0, lay.num_words(), 1024, [&](int64_t begin, int64_t end) {
        run(begin, end, begin * 32, (end - begin) * 32);
      });
    } else {
      at::parallel_for(0, lay.rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(lay.cols, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t r = begin; r < end; ++r) {
                           run(r * lay.words_per_row, (r + 1) * lay.words_per_row, r * lay.cols, lay.cols);
                         }
                       });
    }
    return;
  }
  const BytePositions& pos = byte_positions();
  parallel_for_words(lay, 1024, [&](int64_t w, int64_t base, int64_t len) {
    const uint32_t valid = valid_bits(len);
    const uint32_t bits = static_cast<uint32_t>(words[w]) & valid;
    kept_t kept_buf[40];
    pruned_t pruned_buf[40];
    const int nk = left_pack(kept_from + base, bits, len, kept_buf, pos);
    const int np = left_pack(pruned_from + base, ~bits & valid, len, pruned_buf, pos);
    const int64_t ko = kept_before[w];
    std::memcpy(kept_out + ko, kept_buf, sizeof(kept_t) * nk);
    std::memcpy(pruned_out + (base - ko), pruned_buf, sizeof(pruned_t) * np);
  });
}

// fn(bits_t{}) with the unsigned type of a 2, 4 or 8 byte element: the values are copied, never read
template <typename F>
void with_bits_type(const at::Tensor& t, const char* name, size_t i, const F& fn) {
  switch (t.element_size()) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    case 8: fn(uint64_t{}); break;
    default: TORCH_CHECK(false, "mask_subsets: ", name, "[", i, "] has elements of ", t.element_size(), " bytes");
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mask_subsets(at::TensorList kept_from,
                                                                           at::TensorList pruned_from,
                                                                           at::TensorList mask_words) {
  TORCH_CHECK(kept_from.size() == pruned_from.size() && kept_from.size() == mask_words.size(), "mask_subsets: ",
              kept_from.size(), " kept_from, ", pruned_from.size(), " pruned_from and ", mask_words.size(),
              " masks");
  std::vector<at::Tensor> kept, pruned;
  for (size_t i = 0; i < kept_from.size(); ++i) {
    const at::Tensor& a = kept_from[i];
    const at::Tensor& b = pruned_from[i];
    TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && b.device().is_cpu() && b.is_contiguous() &&
                    a.sizes() == b.sizes(),
                "mask_subsets: kept_from[", i, "] and pruned_from[", i, "] must be contiguous CPU tensors of one shape");
    dsd_kernels_args::check_words("mask_subsets", i, mask_words[i], a, "kept_from");
    const MaskLayout lay(a);
    const int32_t* words = mask_words[i].data_ptr<int32_t>();
    const auto before = kept_offsets(lay, words);
    const int64_t n_kept = before.back();
    at::Tensor k = at::empty({n_kept}, a.options());
    at::Tensor p = at::empty({a.numel() - n_kept}, b.options());
    with_bits_type(a, "kept_from", i, [&](auto kept_bits) {
      using kept_t = decltype(kept_bits);
      with_bits_type(b, "pruned_from", i, [&](auto pruned_bits) {
        using pruned_t = decltype(pruned_bits);
        compact<kept_t, pruned_t>(lay, words, before, static_cast<const kept_t*>(a.const_data_ptr()),
                                  static_cast<const pruned_t*>(b.const_data_ptr()), static_cast<kept_t*>(k.data_ptr()),
                                  static_cast<pruned_t*>(p.data_ptr()));
      });
    });
    kept.push_back(k);
    pruned.push_back(p);
  }
  return {kept, pruned};
}

// deposit[mask][src]: the low popcount(mask) bits of src placed at mask's set bits, per byte.
const std::array<std::array<uint8_t, 256>, 256>& deposit_table() {
  static const auto table = [] {
    std::array<std::array<uint8_t, 256>, 256> t{};
    for (int mask = 0; mask < 256; ++mask) {
      for (int src = 0; src < 256; ++src) {
        int out = 0, from = 0;
        for (int bit = 0; bit < 8; ++bit) {
          if (mask >> bit & 1) out |= ((src >> from++) & 1) << bit;
        }
        t[mask][src] = static_cast<uint8_t>(out);
      }
    }
    return t;
  }();
  return table;
}

inline uint32_t deposit(uint32_t src, uint32_t mask, const std::array<std::array<uint8_t, 256>, 256>& table) {
  uint32_t out = 0;
  for (int byte = 0; byte < 4; ++byte) {
    const uint32_t m = (mask >> (8 * byte)) & 0xFFu;
    out |= static_cast<uint32_t>(table[m][src & 0xFFu]) << (8 * byte);
    src >>= kByteCounts.count[m];
  }
  return out;
}

// Up to 32 bits of a packed bit stream from bit `pos` (bits past its end read as 0).
inline uint32_t stream_bits(const int32_t* words, int64_t num_words, int64_t pos) {
  const int64_t w = pos >> 5;
  if (w >= num_words) return 0;
  const uint64_t lo = static_cast<uint32_t>(words[w]);
  const uint64_t hi = w + 1 < num_words ? static_cast<uint32_t>(words[w + 1]) : 0;
  return static_cast<uint32_t>(((hi << 32) | lo) >> (pos & 31));
}

// The words of a selection over a 1-D subset of n values: smallest=true: 0 at the k smallest |v|
// (dropped), 1 elsewhere; smallest=false: 1 at the k largest (what a selection pruning the
// others keeps: grown), 0 elsewhere.
template <typename scalar_t>
void choose(const scalar_t* values, int64_t n, int64_t k, bool smallest, int32_t* out) {
  const MaskLayout lay(1, n);
  if (lay.num_words() == 0) return;
  const int64_t pruned = smallest ? k : n - k;
  selection::Selection sel;
  if (pruned > 0) sel = selection::radix_select<scalar_t>(values, n, pruned);
  selection::write_mask<scalar_t>(values, lay, sel, pruned > 0, out);
}

// fn(scalar_t{}) with the floating type of t
template <typename F>
void with_float_type(const at::Tensor& t, const F& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "mask_update", [&] { fn(scalar_t{}); });
}

// One tensor's update: its kept weights and pruned scores split into the calling thread's scratch
// (kept in a buffer between calls: nothing is allocated in the steady state), the two selections
// over them, then the new words: a word's kept bits take, in order, the next bits of the drop
// selection (1: stays), its pruned bits the next of the grow selection (1: grown), read from
// those packed streams at the word's offsets. A deposit of bits into a word's set positions (a
// software pdep: BMI2's is slow on older AMD CPUs, and absent elsewhere) takes 4 byte-table reads.
void update_one(const at::Tensor& weights, const at::Tensor& scores, const int32_t* words, int64_t k, size_t i,
                int32_t* new_words) {
  const MaskLayout lay(weights);
  const auto before = kept_offsets(lay, words);
  const int64_t n = weights.numel(), n_kept = before.back(), n_pruned = n - n_kept;
  TORCH_CHECK_VALUE(k <= std::min(n_kept, n_pruned), "mask_update: counts[", i, "]=", k, " but masks[", i, "] keeps ",
                    n_kept, " and prunes ", n_pruned, " entries: at most ", std::min(n_kept, n_pruned), " can move");
  const int64_t kept_words = (n_kept + 31) / 32, grown_words = (n_pruned + 31) / 32;
  int32_t* choices = thread_scratch<int32_t>(static_cast<size_t>(kept_words + grown_words));
  int32_t* stays_bits = choices;
  int32_t* grown_bits = choices + kept_words;
  with_float_type(weights, [&](auto weight_zero) {
    using kept_t = decltype(weight_zero);
    with_float_type(scores, [&](auto score_zero) {
      using pruned_t = decltype(score_zero);
      // one scratch per element type: two subsets of one type share a buffer of both sizes
      kept_t* kept;
      pruned_t* pruned;
      if constexpr (std::is_same_v<kept_t, pruned_t>) {
        kept = thread_scratch<kept_t>(static_cast<size_t>(n));
        pruned = kept + n_kept;
      } else {
        kept = thread_scratch<kept_t>(static_cast<size_t>(n_kept));
        pruned = thread_scratch<pruned_t>(static_cast<size_t>(n_pruned));
      }
      using kept_bits_t = typename KeyTraits<kept_t>::bits_t;
      using pruned_bits_t = typename KeyTraits<pruned_t>::bits_t;
      compact<kept_bits_t, pruned_bits_t>(lay, words, before, static_cast<const kept_bits_t*>(weights.const_data_ptr()),
                                          static_cast<const pruned_bits_t*>(scores.const_data_ptr()),
                                          reinterpret_cast<kept_bits_t*>(kept), reinterpret_cast<pruned_bits_t*>(pruned));
      choose<kept_t>(kept, n_kept, k, /*smallest=*/true, stays_bits);
      choose<pruned_t>(pruned, n_pruned, k, /*smallest=*/false, grown_bits);
    });
  });
  const auto& table = deposit_table();
  parallel_for_words(lay, 2048, [&](int64_t w, int64_t base, int64_t len) {
    const uint32_t valid = valid_bits(len);
    const uint32_t keep = static_cast<uint32_t>(words[w]) & valid;
    const int64_t ko = before[w];
    const uint32_t stays = deposit(stream_bits(stays_bits, kept_words, ko), keep, table);
    const uint32_t grows = deposit(stream_bits(grown_bits, grown_words, base - ko), ~keep & valid, table);
    new_words[w] = static_cast<int32_t>(stays | grows);
  });
}

std::vector<at::Tensor> mask_update(at::TensorList weights, at::TensorList scores, at::TensorList mask_words,
                                    at::IntArrayRef counts) {
  TORCH_CHECK(weights.size() == scores.size() && weights.size() == mask_words.size() &&
                  weights.size() == counts.size(),
              "mask_update: one weight, score, mask and count per tensor");
  std::vector<at::Tensor> out(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& s = scores[i];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && s.device().is_cpu() && s.is_contiguous() &&
                    w.sizes() == s.sizes(),
                "mask_update: weights[", i, "] and scores[", i, "] must be contiguous CPU tensors of one shape");
    TORCH_CHECK(at::isFloatingType(w.scalar_type()) && at::isFloatingType(s.scalar_type()), "mask_update: weights[",
                i, "] and scores[", i, "] must be floating point");
    TORCH_CHECK_VALUE(counts[i] >= 0, "mask_update: counts[", i, "] must be >= 0, got ", counts[i]);
    dsd_kernels_args::check_words("mask_update", i, mask_words[i], w, "weights");
    out[i] = at::empty_like(mask_words[i]);
  }
  const auto update = [&](size_t i) {
    update_one(weights[i], scores[i], mask_words[i].data_ptr<int32_t>(), counts[i], i, out[i].data_ptr<int32_t>());
  };
  std::vector<int64_t> numels;
  for (const auto& w : weights) numels.push_back(w.numel());
  for_each_tensor(numels, update);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("mask_subsets", &mask_subsets);
  m.impl("mask_update", &mask_update);
}

}  // namespace dsd_kernels_cpu
