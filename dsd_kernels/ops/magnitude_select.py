"""Exact magnitude selection: `magnitude_thresholds` and `magnitude_masks` (custom ops
`dsd_kernels::magnitude_thresholds` and `::magnitude_masks`), per tensor or in tiles, on plain
tensors or DTensor shards."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor

from .. import _backend
from .._dtensor import local_tensor
from .._floatbits import KEY_SPECS
from ..masks import Mask, mask_rows_cols, packed_shape
from ._common import (any_dtensor, as_tensor_list, check_float_same_device, dtypes_of, nm_pattern, sparsity_list,
                      threshold_dtype)
from .nm_masks import check_nm_rows

__all__ = ["magnitude_thresholds", "magnitude_masks"]


def _check_select_args(tensors: list[Tensor], sparsities: list[float]) -> None:
    """The checks of the selection ops' real and fake implementations (direct torch.ops calls)."""
    torch._check_value(len(tensors) == len(sparsities),
                       lambda: f"magnitude selection: {len(tensors)} tensors but {len(sparsities)} sparsities")
    for i, (t, s) in enumerate(zip(tensors, sparsities)):
        torch._check_type(t.dtype in KEY_SPECS,
                          lambda: f"tensors[{i}] has dtype {t.dtype}; magnitude selection needs a "
                                  f"floating tensor (float16, bfloat16, float32 or float64)")
        torch._check_value(t.device == tensors[0].device,
                           lambda: f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}")
        torch._check_value(0.0 <= s <= 1.0, lambda: f"sparsities[{i}] must be in [0, 1], got {s}")


def _select(tensors: list[Tensor], sparsities: list[float], want_masks: bool):
    _check_select_args(tensors, sparsities)
    if not tensors:
        return torch.empty(0, dtype=torch.float64), []
    impl = _backend.implementation("magnitude_select", tensors[0].device, dtypes_of(tensors))
    return impl.magnitude_select(tensors, sparsities, want_masks=want_masks,
                                 out_dtype=threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_thresholds", mutates_args=())
def _magnitude_thresholds_op(tensors: List[Tensor], sparsities: List[float]) -> Tensor:
    return _select(tensors, sparsities, want_masks=False)[0]


@_magnitude_thresholds_op.register_fake
def _(tensors, sparsities):
    _check_select_args(tensors, sparsities)
    torch._check_value(len(tensors) > 0, lambda: "magnitude_thresholds: tensors is empty")
    return tensors[0].new_empty((len(tensors),), dtype=threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_masks", mutates_args=())
def _magnitude_masks_op(tensors: List[Tensor], sparsities: List[float]) -> List[Tensor]:
    """The packed int32 keep-words of every tensor (see masks.py for the layout)."""
    return _select(tensors, sparsities, want_masks=True)[1]


@_magnitude_masks_op.register_fake
def _(tensors, sparsities):
    _check_select_args(tensors, sparsities)
    return [t.new_empty(packed_shape(t.shape), dtype=torch.int32) for t in tensors]


def _sharded_select(tensors: list[Tensor], sparsities: list[float], want_masks: bool):
    """Thresholds and local masks of DTensors, with the backend the registry picks for the
    device of their local shards (distributed.py runs the collectives around its kernels)."""
    from .. import distributed
    local_device = local_tensor(tensors[0]).device
    return distributed.sharded_select(
        tensors, sparsities, want_masks=want_masks,
        local=_backend.implementation("magnitude_select", local_device, dtypes_of(tensors)),
        sharded=_backend.implementation("magnitude_select_sharded", local_device, dtypes_of(tensors)))


def magnitude_thresholds(tensors, sparsity) -> Tensor:
    """Exact per-tensor magnitude thresholds: the k-th smallest |w|, k = round(s * numel).

    tensors: a float tensor or an iterable of them (one device; any shapes and float dtypes).
    sparsity: one float in [0, 1] for all tensors, or one per tensor.
    Returns a 1-D tensor with one threshold per tensor (-inf where k == 0), in the
    promoted dtype of the inputs, on their device. NaN ranks above +inf; -0.0 == 0.0.
    """
    tensors = as_tensor_list(tensors)
    sparsities = sparsity_list(sparsity, len(tensors))
    if any(isinstance(s, str) for s in sparsities):
        raise ValueError("magnitude_thresholds: an N:M sparsity has no one threshold per tensor (each group of M "
                         "has its own); use magnitude_masks")
    if not tensors:
        return torch.empty(0)
    check_float_same_device(tensors)
    if any_dtensor(tensors):
        found, _ = _sharded_select(tensors, sparsities, want_masks=False)
        return found.to(threshold_dtype(tensors))
    return torch.ops.dsd_kernels.magnitude_thresholds([t.detach() for t in tensors], sparsities)


def _check_block(block) -> tuple[int, int] | None:
    if block is None:
        return None
    if (not isinstance(block, Sequence) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be None or two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def _tile_l1(t: Tensor, bh: int, bw: int) -> Tensor:
    """L1 norm of every (bh x bw) tile of t viewed as (rows, cols); edge tiles are partial."""
    rows, cols = mask_rows_cols(t.shape)
    tiles_r, tiles_c = -(-rows // bh), -(-cols // bw)
    padded = torch.zeros(tiles_r * bh, tiles_c * bw, dtype=torch.float64, device=t.device)
    padded[:rows, :cols] = t.detach().reshape(rows, cols).abs()
    return padded.view(tiles_r, bh, tiles_c, bw).sum((1, 3))


def magnitude_masks(tensors, sparsity, block=None) -> list[Mask]:
    """Exact magnitude masks: per tensor, the k = round(s * numel) smallest |w| are pruned.

    tensors: a float tensor or an iterable of them (one device). Ties in |w| are pruned
    lowest flat index first, so exactly k weights are pruned whatever the values
    (all-equal weights included). Returns one packed Mask per tensor.

    sparsity "N:M" (e.g. "2:4"), for all tensors or some: each tensor viewed as (shape[0], -1)
    keeps, in every M consecutive weights of a row, the N largest |w| (the same tie rule within
    the group; NaN counts as the largest); a row length that is not a multiple of M is a
    ValueError naming the tensor.

    block=(bh, bw): prune whole tiles of each tensor (viewed as (shape[0], numel/shape[0]))
    instead, ranked by their L1 norm (summed in fp64), exactly round(s * tiles) tiles per
    tensor with the same tie rules over tiles in row-major order. Edge tiles may be
    partial, so the pruned fraction of weights can differ slightly from s. Use the
    matmul's tile (64, 64) to turn sparsity into speed in masked_linear.
    """
    tensors = as_tensor_list(tensors)
    sparsities = sparsity_list(sparsity, len(tensors))
    block = _check_block(block)
    if not tensors:
        return []
    check_float_same_device(tensors)
    if any(isinstance(s, str) for s in sparsities):
        return _with_nm_patterns(tensors, sparsities, block)
    if block is not None:
        if any_dtensor(tensors):
            raise NotImplementedError("block pruning of DTensors is not supported yet")
        bh, bw = block
        scores = [_tile_l1(t, bh, bw) for t in tensors]
        tile_masks = magnitude_masks(scores, sparsities)
        masks = []
        for t, tm in zip(tensors, tile_masks):
            rows, cols = mask_rows_cols(t.shape)
            keep = tm.to_bool().repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
            masks.append(Mask.from_bool(keep.reshape(t.shape)))
        return masks
    if any_dtensor(tensors):
        return _sharded_select(tensors, sparsities, want_masks=True)[1]
    words = torch.ops.dsd_kernels.magnitude_masks([t.detach() for t in tensors], sparsities)
    return [Mask(w, t.shape) for w, t in zip(words, tensors)]



def _with_nm_patterns(tensors: list[Tensor], sparsities: list, block) -> list[Mask]:
    """magnitude_masks where some sparsities are N:M patterns: one nm_masks call per pattern,
    one selection call for the fractions."""
    if block is not None:
        raise ValueError("block= takes a fraction of tiles; an N:M sparsity already fixes its groups")
    if any_dtensor(tensors):
        raise NotImplementedError("N:M masks of DTensors are not supported yet")
    masks: list = [None] * len(tensors)
    groups: dict = {}
    for i, s in enumerate(sparsities):
        groups.setdefault(s if isinstance(s, str) else None, []).append(i)
    for pattern, index in groups.items():
        chosen = [tensors[i] for i in index]
        if pattern is None:
            found = magnitude_masks(chosen, [sparsities[i] for i in index])
        else:
            n, m = nm_pattern(pattern)
            check_nm_rows(chosen, n, m, names=[f"tensors[{i}]" for i in index])
            found = [Mask(w, t.shape) for w, t in
                     zip(torch.ops.dsd_kernels.nm_masks([t.detach() for t in chosen], n, m), chosen)]
        for i, mask in zip(index, found):
            masks[i] = mask
    return masks
