// The sharded selection's radix passes, per shard (dsd_kernels/distributed.py runs the collectives
// between them): each pass's histogram of this shard's keys (radix_histogram) and the masks from
// a threshold found across the shards (threshold_masks). The bracket path's kernels:
// sharded_bracket.cpp (its pass) and sharded_resolve.cpp (bucket entries, mask resolution);
// shared pieces: selection.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "selection.h"

namespace dsd_kernels_cpu {
namespace {

using namespace selection;

// ---------------------------------------------------------------- sharded selection
// distributed.py runs the radix passes of a selection over weights sharded across processes:
// per pass, each process histograms its shards here, the histograms are summed across
// processes, and the digit is located from the sum. These two ops are its per-shard kernels.

// One radix pass over float values: the digit (key >> shift) & (2^width - 1) of the keys whose
// higher bits (key >> (shift + width)) equal prefix, added to out_row (2^width counters); with
// gather, those keys are also returned (in no particular order) for the later passes. The first
// pass (no higher bits) cannot know the digit yet: with gather and a quantile (k/n of the global
// selection) it gathers, as the local select does, the keys whose digit lies in the range a
// sample of this shard predicts, and reports the range in *range_lo / *range_span (span kNoRange:
// nothing gathered; the caller re-reads the values if the chosen digit falls outside).
template <typename scalar_t, typename count_t>
at::Tensor histogram_values(const at::Tensor& src, uint64_t prefix, int shift, int width, bool gather,
                            double quantile, int64_t* out_row, uint64_t* range_lo,
                            uint64_t* range_span) {
  using T = KeyTraits<scalar_t>;
  using bits_t = typename T::bits_t;
  const at::Tensor c = src.contiguous();
  const scalar_t* data = c.data_ptr<scalar_t>();
  const int64_t n = c.numel();
  const int threads = at::get_num_threads();
  const int64_t bins = int64_t(1) << width;
  const int high_shift = shift + width;
  const bool whole = high_shift >= T::key_bits;  // no higher bits: every key counts
  std::vector<count_t> local(static_cast<size_t>(threads) * kSubHists * bins, 0);
  std::vector<std::vector<bits_t>> kept(threads);
  uint64_t lo = 0, span = kNoRange;
  if (whole && gather && quantile > 0.0 && n > 0) {
    const auto k = std::clamp<int64_t>(static_cast<int64_t>(std::nearbyint(quantile * static_cast<double>(n))),
                                       1, n);
    span = candidate_digits<scalar_t, true>(data, n, k, shift, &lo);
  }
  std::atomic<bool> overflow{false};
  const int64_t max_gather = n / (8 * threads) + 4096;  // as the local select allows
  // Unclamped keys are cheaper to count (the clamp slows these loops down): NaN keys then
  // spread over the top bins above +inf's, folded into the NaN key's bin below; and under a
  // prefix below +inf's no NaN key can match. Keys gathered in the first pass are clamped as
  // they are copied out (later passes read them).
  // One parallel loop per variant: a loop body holding several variants runs slower.
  auto hist_of = [&]() {
    return local.data() + static_cast<int64_t>(at::get_thread_num()) * kSubHists * bins;
  };
  if (whole && span != kNoRange) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_top_digit<scalar_t, count_t, false, true>(data, begin, end, shift, lo, span, bins, hist_of(),
                                                      &kept[at::get_thread_num()], max_gather, &overflow);
    });
  } else if (whole) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_top_digit<scalar_t, count_t, false, false>(data, begin, end, shift, 0, kNoRange, bins,
                                                       hist_of(), nullptr, 0, nullptr);
    });
  } else if (prefix < static_cast<uint64_t>(T::nan_key - 1) >> high_shift) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_under_prefix<scalar_t, count_t, false>(data, begin, end, shift, bins - 1, high_shift, prefix,
                                                   hist_of(), gather ? &kept[at::get_thread_num()] : nullptr);
    });
  } else {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      count_under_prefix<scalar_t, count_t, true>(data, begin, end, shift, bins - 1, high_shift, prefix,
                                                  hist_of(), gather ? &kept[at::get_thread_num()] : nullptr);
    });
  }
  if (whole) {  // the clamped histogram: every NaN key in the NaN key's bin
    const int64_t nan_bin = static_cast<int64_t>(T::nan_key >> shift);
    for (int64_t r = 0; r < static_cast<int64_t>(threads) * kSubHists; ++r) {
      count_t* row = local.data() + r * bins;
      for (int64_t b = nan_bin + 1; b < bins; ++b) {
        row[nan_bin] += row[b];
        row[b] = 0;
      }
    }
  }
  for (int64_t r = 0; r < static_cast<int64_t>(threads) * kSubHists; ++r) {
    for (int64_t b = 0; b < bins; ++b) out_row[b] += static_cast<int64_t>(local[r * bins + b]);
  }
  if (overflow.load()) span = kNoRange;
  *range_lo = lo;
  *range_span = whole ? span : kNoRange;
  if (!gather || (whole && span == kNoRange)) return c;  // nothing gathered: keep the values
  int64_t total = 0;
  for (const auto& v : kept) total += static_cast<int64_t>(v.size());
  const auto key_dtype = sizeof(bits_t) == 2 ? at::kShort : sizeof(bits_t) == 4 ? at::kInt : at::kLong;
  at::Tensor out = at::empty({total}, c.options().dtype(key_dtype));
  auto* dst = static_cast<bits_t*>(out.data_ptr());
  for (const auto& v : kept) {
    for (const bits_t key : v) *dst++ = key < T::nan_key ? key : T::nan_key;
  }
  return out;
}

// The same pass over keys gathered by an earlier pass (int16/int32/int64 tensors of keys).
template <typename key_t>
at::Tensor histogram_keys(const at::Tensor& src, uint64_t prefix, int shift, int width, bool gather,
                          int64_t* out_row) {
  const at::Tensor c = src.contiguous();
  const key_t* keys = c.data_ptr<key_t>();
  const int64_t n = c.numel();
  const uint64_t digit_mask = (uint64_t(1) << width) - 1;
  const int high_shift = shift + width;
  // branch-free: about half of the gathered keys match (they share the previous digit range),
  // which a branch would mispredict
  std::vector<key_t> kept(gather ? n : 0);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = static_cast<uint64_t>(keys[i]);  // keys are non-negative
    const int64_t match = high_shift >= 64 || (key >> high_shift) == prefix;
    out_row[(key >> shift) & digit_mask] += match;
    if (gather) {
      kept[count] = keys[i];
      count += match;
    }
  }
  if (!gather) return c;
  at::Tensor out = at::empty({count}, c.options());
  std::copy(kept.begin(), kept.begin() + count, out.data_ptr<key_t>());
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>> radix_histogram(
    at::TensorList sources, at::IntArrayRef prefixes, int64_t shift, int64_t width, bool gather,
    at::ArrayRef<double> quantiles) {
  TORCH_CHECK(sources.size() == prefixes.size() && sources.size() == quantiles.size(),
              "radix_histogram: ", sources.size(), " sources but ", prefixes.size(), " prefixes and ",
              quantiles.size(), " quantiles");
  TORCH_CHECK(width >= 1 && width <= dsd_kernels_keys::kMaxDigitBits && shift >= 0,
              "radix_histogram: width must be in [1, ", dsd_kernels_keys::kMaxDigitBits,
              "] and shift >= 0, got width ", width, ", shift ", shift);
  const auto count = static_cast<int64_t>(sources.size());
  at::Tensor hist = at::zeros({count, int64_t(1) << width}, at::kLong);
  std::vector<at::Tensor> next;
  std::vector<int64_t> ranges(2 * count, -1);  // per source: first digit and span gathered, or -1
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& src = sources[i];
    TORCH_CHECK(src.device().is_cpu(), "radix_histogram: sources[", i, "] is not a CPU tensor");
    TORCH_CHECK(prefixes[i] >= 0, "radix_histogram: prefixes[", i, "] must be >= 0");
    const auto prefix = static_cast<uint64_t>(prefixes[i]);
    const int sh = static_cast<int>(shift), wd = static_cast<int>(width);
    int64_t* row = hist.data_ptr<int64_t>() + i * (int64_t(1) << width);
    switch (src.scalar_type()) {
      case at::kShort: next.push_back(histogram_keys<int16_t>(src, prefix, sh, wd, gather, row)); break;
      case at::kInt: next.push_back(histogram_keys<int32_t>(src, prefix, sh, wd, gather, row)); break;
      case at::kLong: next.push_back(histogram_keys<int64_t>(src, prefix, sh, wd, gather, row)); break;
      default:
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "radix_histogram", [&] {
          uint64_t lo = 0, span = kNoRange;
          next.push_back(src.numel() < (int64_t(1) << 32)
                             ? histogram_values<scalar_t, uint32_t>(src, prefix, sh, wd, gather,
                                                                    quantiles[i], row, &lo, &span)
                             : histogram_values<scalar_t, int64_t>(src, prefix, sh, wd, gather,
                                                                   quantiles[i], row, &lo, &span));
          if (span != kNoRange) {
            ranges[2 * i] = static_cast<int64_t>(lo);
            ranges[2 * i + 1] = static_cast<int64_t>(span);
          }
        });
    }
  }
  return {hist, next, ranges};
}

// Packed keep-words from a threshold found elsewhere: key > keys[i] is kept, and of the ties[i]
// elements whose key equals keys[i], all but the first prune_ties[i] in flat order; keys[i] < 0
// keeps everything (nothing to prune).
std::vector<at::Tensor> threshold_masks(at::TensorList tensors, at::IntArrayRef keys,
                                        at::IntArrayRef prune_ties, at::IntArrayRef ties) {
  TORCH_CHECK(tensors.size() == keys.size() && keys.size() == prune_ties.size() &&
                  keys.size() == ties.size(),
              "threshold_masks: tensors, keys, prune_ties and ties must have equal lengths");
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor c = tensors[i].contiguous();
    TORCH_CHECK(c.device().is_cpu(), "threshold_masks: tensors[", i, "] is not a CPU tensor");
    TORCH_CHECK(prune_ties[i] >= 0 && prune_ties[i] <= ties[i], "threshold_masks: prune_ties[", i,
                "] must be in [0, ties[", i, "]]");
    MaskLayout lay(c);
    at::Tensor out = at::empty({lay.rows, lay.words_per_row}, c.options().dtype(at::kInt));
    Selection sel;
    sel.key = static_cast<uint64_t>(std::max<int64_t>(keys[i], 0));
    sel.need = prune_ties[i];
    sel.count_eq = ties[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "threshold_masks", [&] {
      if (lay.num_words() > 0) {
        write_mask<scalar_t>(c.data_ptr<scalar_t>(), lay, sel, keys[i] >= 0, out.data_ptr<int32_t>());
      }
    });
    masks.push_back(out);
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_kernels_cpp, CPU, m) {
  m.impl("radix_histogram", &radix_histogram);
  m.impl("threshold_masks", &threshold_masks);
}

}  // namespace dsd_kernels_cpu
