"""Reference re-masking: pruned entries set to exactly 0, tensor by tensor."""
from __future__ import annotations

import torch


def apply_masks_(tensors: list[torch.Tensor], keeps: list[torch.Tensor | None]) -> None:
    """keeps[i]: bool tensor of tensors[i]'s shape (True = kept) or None (left as is)."""
    with torch.no_grad():
        for t, keep in zip(tensors, keeps):
            if keep is not None:
                t.masked_fill_(~keep, 0)
