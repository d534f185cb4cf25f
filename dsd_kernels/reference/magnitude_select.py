"""Reference magnitude selection: a stable sort of |w|.

Contract (DESIGN.md): per tensor of N elements, k = round(s * N) elements are pruned,
those with the k smallest |w|; ties broken by lower flat index; -0.0 == 0.0; NaN ranks
above +inf. The threshold is the k-th smallest |w|, -inf where k == 0.
"""
from __future__ import annotations

import torch


def pruned_count(numel: int, sparsity: float) -> int:
    """k = round(s * N) with Python's round, as torch.nn.utils.prune counts."""
    return round(sparsity * numel)


def _ascending_order(t: torch.Tensor) -> torch.Tensor:
    # abs() maps -0.0 to 0.0; a stable sort keeps lower flat indices first among ties,
    # and torch.sort places every NaN after +inf (NaNs equal to each other).
    return torch.sort(t.detach().abs().reshape(-1).double(), stable=True).indices


def magnitude_masks(tensors: list[torch.Tensor], sparsities: list[float]) -> list[torch.Tensor]:
    """Boolean keep-masks (True = kept), one per tensor, of the tensor's shape."""
    masks = []
    for t, s in zip(tensors, sparsities):
        keep = torch.ones(t.numel(), dtype=torch.bool, device=t.device)
        keep[_ascending_order(t)[: pruned_count(t.numel(), s)]] = False
        masks.append(keep.reshape(t.shape))
    return masks


def magnitude_thresholds(tensors: list[torch.Tensor], sparsities: list[float]) -> list[float]:
    """The k-th smallest |w| per tensor as a Python float (-inf where k == 0)."""
    out = []
    for t, s in zip(tensors, sparsities):
        k = pruned_count(t.numel(), s)
        if k == 0:
            out.append(float("-inf"))
        else:
            flat = t.detach().abs().reshape(-1)
            out.append(float(flat[_ascending_order(t)[k - 1]]))
    return out


def nm_masks(tensors: list[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    """N:M keep-masks (True = kept), one per tensor of its shape: the tensor viewed as
    (shape[0], -1) (one row below 2 dims), every M consecutive weights of a row keep their N
    largest |w|, with the selection's order (a stable sort: equal |w| prune the lower index
    first; NaN above +inf; -0.0 == 0.0). Row lengths must be multiples of M."""
    masks = []
    for t in tensors:
        groups = t.detach().abs().double().reshape(-1, m)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=t.device)
        order = torch.sort(groups, dim=1, stable=True).indices
        keep.scatter_(1, order[:, m - n:], True)
        masks.append(keep.reshape(t.shape))
    return masks
