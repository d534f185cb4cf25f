"""magnitude_select on the compiled kernels: csrc/cpu/magnitude_select.cpp on CPU tensors,
csrc/cuda/magnitude_select.cu on CUDA tensors; the sharded selection's per-shard kernels
(radix_histogram, threshold_masks) exist on CPU only."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def magnitude_select(tensors, sparsities, *, want_masks: bool, out_dtype: torch.dtype):
    thresholds, masks = torch.ops.dsd_kernels_cpp.magnitude_select(
        [t.detach() for t in tensors], [float(s) for s in sparsities], want_masks)
    return thresholds.to(out_dtype), list(masks)


def digit_histograms(sources, prefixes, shift: int, width: int, *, gather: bool):
    """See composite.magnitude_select.digit_histograms."""
    hist, sources = torch.ops.dsd_kernels_cpp.radix_histogram(
        [s.detach() for s in sources], [int(p) for p in prefixes], shift, width, gather)
    return hist, list(sources)


def threshold_masks(tensors, keys, need, ties_before, local_ties):
    """See composite.magnitude_select.threshold_masks."""
    mine = [min(max(n - b, 0), t) for n, b, t in zip(need, ties_before, local_ties)]
    return list(torch.ops.dsd_kernels_cpp.threshold_masks(
        [t.detach() for t in tensors], [-1 if k is None else int(k) for k in keys], mine,
        [int(t) for t in local_ties]))
