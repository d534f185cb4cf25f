"""N:M masks on the C++ CPU kernel (csrc/cpu/nm_masks.cpp): one read of each weight, 1 bit
written per weight, in parallel over chunks of whole mask words."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def nm_masks(tensors, n: int, m: int) -> list[torch.Tensor]:
    return list(torch.ops.dsd_kernels_cpp.nm_masks(list(tensors), int(n), int(m)))
