"""Exact magnitude selection over sharded weights (DTensor, as FSDP2's fully_shard holds them).

A weight sharded on dim 0 over a 1-D device mesh is never gathered: each rank histograms the
keys of its own shard, the histograms of all layers of the batch are summed with one
all_reduce per radix pass (11-bit digits: 3 passes for fp32), and every rank finds the same
exact global k-th key. The tie rule (lower global flat index first) holds across shard
boundaries: rank r's rows all precede rank r+1's, so one all_gather of the per-rank tie
counts tells each rank how many of the ties to prune are its own. Each rank gets its local
masks; gathered along dim 0 they equal the single-process masks bit for bit.

Collective traffic per call: passes x layers x 2048 x 8 bytes (all_reduce) + ranks x layers
x 8 bytes (all_gather), independent of the number of weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._floatbits import KEY_SPECS, digit_widths, keys_to_values, magnitude_keys
from .composite.radix_select import keep_mask
from .masks import Mask, pack_bool

DIGIT_BITS = 11
COLLECTIVE_BYTES = [0]  # bytes sent through collectives by this module (tests and notes)

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Replicate, Shard


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _placement(t: DTensor, name: str) -> str:
    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{name}: DTensor on a {mesh.ndim}-D device mesh; only 1-D meshes "
                                  f"are supported")
    (p,) = t.placements
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard) and p.dim == 0:
        return "shard0"
    raise NotImplementedError(f"{name}: DTensor placement {p!r} is not supported; use Shard(0) "
                              f"(as FSDP2 shards) or Replicate()")


def _all_reduce(t: torch.Tensor, group) -> None:
    COLLECTIVE_BYTES[0] += t.numel() * t.element_size()
    dist.all_reduce(t, group=group)


def sharded_select(tensors, sparsities, *, want_masks: bool):
    """Thresholds (float64, global, same on every rank) and the local masks of DTensors.

    Replicated tensors are selected locally (every rank holds the same values, so the same
    bits). Shard(0) tensors of one batch share one process group (the first one's mesh).
    """
    from .ops import magnitude_masks, magnitude_thresholds

    thresholds = [float("-inf")] * len(tensors)
    masks: list[Mask | None] = [None] * len(tensors)
    sharded = []
    for i, t in enumerate(tensors):
        if _placement(t, f"tensors[{i}]") == "replicate":
            local = t.to_local()
            thresholds[i] = float(magnitude_thresholds(local, sparsities[i])[0])
            if want_masks:
                masks[i] = magnitude_masks(local, sparsities[i])[0]
        else:
            sharded.append(i)
    if sharded:
        group = tensors[sharded[0]].device_mesh.get_group()
        found, local_masks = _select_sharded([tensors[i] for i in sharded],
                                             [sparsities[i] for i in sharded], group, want_masks)
        for j, i in enumerate(sharded):
            thresholds[i] = found[j]
            if want_masks:
                masks[i] = local_masks[j]
    return thresholds, masks


def _select_sharded(tensors, sparsities, group, want_masks):
    locals_ = [t.to_local().detach().contiguous() for t in tensors]
    keys = [magnitude_keys(x) for x in locals_]
    device = keys[0].device
    ranks = [round(s * t.numel()) for t, s in zip(tensors, sparsities)]  # global counts
    state = [[0, r, 0] for r in ranks]  # prefix, rank still to find, count at the final key
    candidates = list(keys)
    # one all_reduce per pass for the whole batch: layers of one dtype share the digit widths
    by_bits: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        by_bits.setdefault(KEY_SPECS[t.dtype].key_bits, []).append(i)
    for key_bits, index in by_bits.items():
        shift = key_bits
        for width in digit_widths(key_bits, DIGIT_BITS):
            shift -= width
            hist = torch.zeros(len(index), 1 << width, dtype=torch.int64, device=device)
            for row, i in enumerate(index):
                if ranks[i] > 0:
                    digits = (candidates[i] >> shift) & ((1 << width) - 1)
                    hist[row] = torch.bincount(digits.long(), minlength=1 << width)
            _all_reduce(hist, group)
            cum = hist.cumsum(1)
            for row, i in enumerate(index):
                if ranks[i] == 0:
                    continue
                prefix, rank, _ = state[i]
                digit = int(torch.searchsorted(cum[row], rank))
                below = int(cum[row, digit - 1]) if digit else 0
                state[i] = [(prefix << width) | digit, rank - below, int(hist[row, digit])]
                if shift:
                    candidates[i] = candidates[i][((candidates[i] >> shift) & ((1 << width) - 1)) == digit]
    thresholds = []
    for i, t in enumerate(tensors):
        key = state[i][0]
        thresholds.append(float(keys_to_values(torch.tensor([key]), t.dtype)[0]) if ranks[i] else
                          float("-inf"))
    if not want_masks:
        return thresholds, []
    # ties at T: the ones on lower ranks come first in global flat order
    local_ties = torch.tensor([int((k == state[i][0]).sum()) if ranks[i] else 0
                               for i, k in enumerate(keys)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.zeros_like(local_ties) for _ in range(world)]
    COLLECTIVE_BYTES[0] += local_ties.numel() * 8 * world
    dist.all_gather(gathered, local_ties, group=group)
    me = dist.get_rank(group)
    ties_before = sum(gathered[r] for r in range(me)) if me else torch.zeros_like(local_ties)
    masks = []
    for i, (x, k) in enumerate(zip(locals_, keys)):
        if ranks[i] == 0:
            masks.append(Mask.from_bool(torch.ones(x.shape, dtype=torch.bool, device=x.device)))
            continue
        threshold, need = state[i][0], state[i][1]
        mine = min(max(need - int(ties_before[i]), 0), int(local_ties[i]))  # ties pruned here
        keep = keep_mask(k, threshold, mine, int(local_ties[i]))
        masks.append(Mask(pack_bool(keep.reshape(x.shape)), x.shape))
    return thresholds, masks
