"""magnitude_select on the compiled kernels: csrc/cpu/magnitude_select.cpp on CPU tensors,
csrc/cuda/magnitude_select.cu on CUDA tensors; the sharded selection's per-shard kernels
(bracket_pass, bucket_split_, resolve_masks_, radix_histogram, threshold_masks) exist on CPU only."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def magnitude_select(tensors, sparsities, *, want_masks: bool, out_dtype: torch.dtype):
    thresholds, masks = torch.ops.dsd_kernels_cpp.magnitude_select(
        [t.detach() for t in tensors], [float(s) for s in sparsities], want_masks)
    return thresholds.to(out_dtype), list(masks)


class _SampledKeys:
    """A shard's values, and the keys of the top digits [lo, lo + span] gathered from them in the
    first pass (where a sample of the shard put the k-th key): the next pass reads the keys if
    the chosen top digit is in that range, else the values again."""
    __slots__ = ("values", "keys", "lo", "span")

    def __init__(self, values, keys, lo, span):
        self.values, self.keys, self.lo, self.span = values, keys, lo, span

    def source_for(self, top_digit: int) -> torch.Tensor:
        return self.keys if self.lo <= top_digit <= self.lo + self.span else self.values


def digit_histograms(sources, prefixes, shift: int, width: int, *, gather: bool, quantiles=None):
    """See composite.magnitude_select.digit_histograms. With gather and quantiles, the first
    pass also gathers the keys of a sampled digit range (one read of memory when it holds the
    k-th key, as in the local selection)."""
    inputs = [s.source_for(p) if isinstance(s, _SampledKeys) else s.detach()
              for s, p in zip(sources, prefixes)]
    quantiles = [0.0] * len(inputs) if quantiles is None else [float(q) for q in quantiles]
    hist, out, ranges = torch.ops.dsd_kernels_cpp.radix_histogram(
        inputs, [int(p) for p in prefixes], shift, width, gather, quantiles)
    out = [_SampledKeys(x, keys, ranges[2 * i], ranges[2 * i + 1]) if ranges[2 * i] >= 0 else keys
           for i, (x, keys) in enumerate(zip(inputs, out))]
    return hist, out


def threshold_masks(tensors, keys, need, ties_before, local_ties):
    """See composite.magnitude_select.threshold_masks."""
    mine = [min(max(n - b, 0), t) for n, b, t in zip(need, ties_before, local_ties)]
    return list(torch.ops.dsd_kernels_cpp.threshold_masks(
        [t.detach() for t in tensors], [-1 if k is None else int(k) for k in keys], mine,
        [int(t) for t in local_ties]))


def bracket_pass(shards, quantiles, lo, hi, buckets, window_keys, *, want_masks: bool):
    """See csrc/cpu/sharded_bracket.cpp: per shard a row (numel, lo, hi, shift, below, flag,
    window_lo, window_hi, counts..., window keys...), the keys inside the bracket and, with
    want_masks, their positions and the mask words with the bracket's keys pruned."""
    rows, keys, positions, words = torch.ops.dsd_kernels_cpp.bracket_pass(
        [t.detach() for t in shards], [float(q) for q in quantiles], [int(x) for x in lo], [int(x) for x in hi],
        [int(b) for b in buckets], [int(w) for w in window_keys], want_masks)
    return rows, list(keys), list(positions), list(words)


def bucket_split_(tensors, words, keys, positions, lo, hi, widths):
    payload, bucket_positions = torch.ops.dsd_kernels_cpp.bucket_split_(
        [t.detach() for t in tensors], words, keys, positions, [int(x) for x in lo], [int(x) for x in hi],
        [int(w) for w in widths])
    return payload, list(bucket_positions)


def resolve_masks_(tensors, words, keys, positions, thresholds, prune_ties):
    torch.ops.dsd_kernels_cpp.resolve_masks_([t.detach() for t in tensors], words, keys, positions,
                                             [int(k) for k in thresholds], [int(n) for n in prune_ties])
