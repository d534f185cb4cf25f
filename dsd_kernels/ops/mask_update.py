"""The mask update of dynamic sparse training (RigL, SET): `mask_update` (custom op
`dsd_kernels::mask_update`). Per tensor, drop the k smallest |weight| among a mask's kept entries
and grow the k largest |score| among its pruned ones, exactly, with the selection's tie rules.

Both halves are the exact magnitude selection (ops.magnitude_masks, on whichever backend serves
it: C++, torch, Triton, CUDA) run over a subset: the kept weights, and the pruned scores, each
gathered in flat index order so that the selection's tie rule (lower index first) is the
tensor's own. The gathering and the new words are the op's own backend's: on CPU the C++ backend
runs the whole update in one call (one read of both tensors into per-thread scratch, its own
selection over each subset, one pass over the mask words); elsewhere torch ops gather and merge,
and the selection is magnitude_masks on whichever backend serves the device."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from typing import List

import torch
from torch import Tensor

from .. import _backend
from ..masks import Mask, packed_shape
from ._common import as_tensor_list, check_float_same_device, dtypes_of
from .magnitude_select import magnitude_masks

__all__ = ["mask_update"]


def _check_update_args(weights: list[Tensor], scores: list[Tensor], words: list[Tensor], counts: list[int]) -> None:
    """The checks of the op's front end, real and fake implementations."""
    torch._check_value(len(weights) == len(scores) == len(words) == len(counts),
                       lambda: f"mask_update: {len(weights)} weights, {len(scores)} scores, {len(words)} masks and "
                               f"{len(counts)} counts: one of each per tensor")
    for i, (w, s, m, k) in enumerate(zip(weights, scores, words, counts)):
        torch._check_value(s.shape == w.shape,
                           lambda: f"mask_update: scores[{i}] has shape {tuple(s.shape)}, weights[{i}] {tuple(w.shape)}")
        torch._check_value(tuple(m.shape) == packed_shape(w.shape) and m.dtype == torch.int32,
                           lambda: f"mask_update: masks[{i}] are not the packed int32 words of weights[{i}] "
                                   f"(shape {tuple(m.shape)}, expected {packed_shape(w.shape)})")
        torch._check_value(k >= 0, lambda: f"mask_update: counts[{i}] must be >= 0, got {k}")
        torch._check_value(s.device == w.device and m.device == w.device,
                           lambda: f"mask_update: weights[{i}], scores[{i}] and masks[{i}] must share a device")


def _choices(subsets: list[Tensor], counts: list[int], *, smallest: bool) -> list[Tensor]:
    """Per 1-D subset, the packed words of a selection over it: smallest=True: 0 at its counts[i]
    smallest |x| (the dropped), 1 elsewhere; smallest=False: 1 at its counts[i] largest |x| (what a
    selection pruning the others keeps: the grown), 0 elsewhere. One selection call for all."""
    words = [torch.full(((v.numel() + 31) // 32,), -1 if smallest else 0, dtype=torch.int32, device=v.device)
             for v in subsets]
    chosen = [i for i, (v, k) in enumerate(zip(subsets, counts)) if k > 0]
    if chosen:
        # pruned counts as fractions: round(c / n * n) gives back c exactly for any n below 2^52
        pruned = [counts[i] if smallest else subsets[i].numel() - counts[i] for i in chosen]
        masks = magnitude_masks([subsets[i] for i in chosen], [c / subsets[i].numel() for c, i in zip(pruned, chosen)])
        for i, mask in zip(chosen, masks):
            words[i] = mask.packed.reshape(-1)
    return words


def _update(weights: list[Tensor], scores: list[Tensor], words: list[Tensor], counts: list[int]) -> list[Tensor]:
    impl = _backend.implementation("mask_update", weights[0].device, dtypes_of(weights + scores))
    fused = getattr(impl, "update", None)
    if fused is not None:  # the whole update in one call (C++: no subset leaves its thread's scratch)
        return fused(weights, scores, words, counts)
    kept, pruned = impl.mask_subsets(weights, scores, words)
    for i, (k, a, b) in enumerate(zip(counts, kept, pruned)):
        if k > min(a.numel(), b.numel()):
            raise ValueError(f"mask_update: counts[{i}]={k} but masks[{i}] keeps {a.numel()} and prunes "
                             f"{b.numel()} entries: at most {min(a.numel(), b.numel())} can move")
    return impl.merge_mask_update(weights, words, _choices(kept, counts, smallest=True),
                                  _choices(pruned, counts, smallest=False))


@torch.library.custom_op("dsd_kernels::mask_update", mutates_args=())
def _mask_update_op(weights: List[Tensor], scores: List[Tensor], words: List[Tensor],
                    counts: List[int]) -> List[Tensor]:
    """The packed int32 keep-words of every tensor's updated mask."""
    _check_update_args(weights, scores, words, counts)
    return _update(weights, scores, words, counts)


@_mask_update_op.register_fake
def _(weights, scores, words, counts):
    _check_update_args(weights, scores, words, counts)
    return [torch.empty_like(m) for m in words]


def mask_update(weights, scores, masks, counts) -> list[Mask]:
    """New masks after one RigL/SET update: per tensor, the counts[i] kept entries with the
    smallest |weights[i]| are dropped and the counts[i] pruned entries with the largest
    |scores[i]| are grown (RigL: the dense gradient; SET: uniform random draws).

    weights, scores: float tensors (or iterables of them, one device), scores of the weights'
    shapes; masks: one Mask per tensor; counts: an int per tensor (or one for all), at most the
    mask's kept and pruned counts. The selection's rules order both halves (ascending |x|, ties
    by lower flat index, -0.0 == 0.0, NaN above +inf): the dropped are the first counts[i] kept
    entries in that order, the grown the last counts[i] pruned ones. A dropped entry is never
    grown in the same update; the kept count never changes. Returns one Mask per tensor.
    """
    weights = as_tensor_list(weights, "weights")
    scores = as_tensor_list(scores, "scores")
    masks = list(masks.values()) if isinstance(masks, dict) else list(masks)
    if isinstance(counts, int) and not isinstance(counts, bool):
        counts = [counts] * len(weights)
    counts = list(counts)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in counts):
        raise TypeError(f"mask_update: counts must be ints, got {counts!r}")
    if len(masks) != len(weights) or not all(isinstance(m, Mask) for m in masks):
        raise TypeError(f"mask_update: masks must be one dsd_kernels.Mask per weight ({len(weights)}), got "
                        f"{[type(m).__name__ for m in masks]}")
    if not weights:
        return []
    check_float_same_device(weights, "weights")
    check_float_same_device(scores, "scores")
    for i, (w, m) in enumerate(zip(weights, masks)):
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask_update: masks[{i}] has shape {tuple(m.shape)}, weights[{i}] {tuple(w.shape)}")
    words = torch.ops.dsd_kernels.mask_update([w.detach() for w in weights], [s.detach() for s in scores],
                                              [m.packed.to(w.device) for m, w in zip(masks, weights)], counts)
    return [Mask(m, w.shape) for m, w in zip(words, weights)]
