"""N:M masks in plain torch ops: integer keys of |w| (see _floatbits), a stable sort within
every group of M, the N largest kept, packed into words. Row lengths are multiples of M
(checked by the op)."""
from __future__ import annotations

import torch

from ..._floatbits import magnitude_keys
from ...masks import pack_bool


def nm_masks(tensors: list[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    """Packed int32 keep-words (rows, ceil(cols / 32)) of every tensor."""
    out = []
    for t in tensors:
        groups = magnitude_keys(t).view(-1, m)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=t.device)
        keep.scatter_(1, torch.sort(groups, dim=1, stable=True).indices[:, m - n:], True)
        out.append(pack_bool(keep.view(t.shape)))
    return out
