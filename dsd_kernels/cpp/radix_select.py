"""magnitude_select on the C++ CPU kernel (csrc/cpu/radix_select.cpp)."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def magnitude_select(tensors, sparsities, *, want_masks: bool, out_dtype: torch.dtype):
    thresholds, masks = torch.ops.dsd_kernels_cpp.magnitude_select(
        [t.detach() for t in tensors], [float(s) for s in sparsities], want_masks)
    return thresholds.to(out_dtype), list(masks)
