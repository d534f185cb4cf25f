"""Masks as per-parameter optimizer state entries, the form torch.distributed.checkpoint (DCP)
saves and reshards: "mask" holds a parameter's packed keep-words (int32 (rows, ceil(cols / 32)),
bit j of word w = column 32w + j kept; every bit set where it has no mask); for a parameter FSDP2
shards by rows (Shard(0), or replicated) the words are a DTensor placed the same way, so DCP
splits them with the rows on any world size. Every parameter of 2 or more dims that can take a
mask carries the entry, so that a fresh optimizer's state dict, DCP's template for loading, names
them all. MaskedSGD and MaskedAdamW write them in their state_dict; OptimizerMasks adds them to
any optimizer's through its state-dict hooks."""
from __future__ import annotations

import torch
from torch import Tensor

from .._dtensor import Replicate, Shard, is_dtensor, local_tensor
from ..masks import Mask, packed_shape

ENTRY = "mask"


def can_carry_mask(p: Tensor) -> bool:
    return p.dim() >= 2 and (p.is_floating_point() or p.is_complex())


def mask_entry(p: Tensor, mask: Mask | None):
    """The "mask" state entry of parameter p with `mask` (None: unmasked, every bit set); None
    where p takes none (under 2 dims; a sharded p placed otherwise than by rows, unmasked)."""
    if not can_carry_mask(p):
        return None
    local = local_tensor(p)
    words = mask.packed if mask is not None else _all_kept(local.shape, local.device).packed
    if not is_dtensor(p):
        return words
    placements = tuple(p.placements)
    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in placements):
        if mask is None:
            return None
        raise NotImplementedError(f"the mask of a parameter sharded as {placements} cannot be saved: masks of "
                                  f"sharded parameters travel row-sharded (FSDP2's Shard(0))")
    from torch.distributed.tensor import DTensor
    rows, words_per_row = packed_shape(p.shape)
    return DTensor.from_local(words, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((rows, words_per_row)), stride=(words_per_row, 1))


def add_mask_entries(state: dict, params: list[Tensor], masks: dict, carried=None) -> dict:
    """`state` (an optimizer state dict, parameters by index) with a "mask" entry for every
    parameter of `params` (in index order) that carries one (`carried`: a set of ids limiting
    them); the per-parameter dicts are copied, not changed."""
    per_param = dict(state["state"])  # torch's per-parameter dicts are the live state
    for index, p in enumerate(params):
        if carried is not None and id(p) not in carried:
            continue
        entry = mask_entry(p, masks.get(p))
        if entry is not None:
            per_param[index] = {**per_param.get(index, {}), ENTRY: entry}
    return {**state, "state": per_param}


def take_mask_entries(state: dict, params: list[Tensor]) -> tuple[dict, dict]:
    """(`state` without its "mask" entries, {param: Mask or None (every weight kept)}); state keys
    name parameters as the saved groups list them (indices; DCP: qualified names), in `params`'
    order. Every entry is checked (a ValueError naming the parameter) before anything changes."""
    saved_keys = [k for g in state.get("param_groups", []) for k in g.get("params", [])]
    position = {k: i for i, k in enumerate(saved_keys)} if len(saved_keys) == len(params) else {}
    per_param, found = {}, {}
    for key, entry in state.get("state", {}).items():
        if isinstance(entry, dict) and ENTRY in entry:
            entry = dict(entry)
            index = position.get(key, key)
            found[param_at(index, params)] = mask_from_entry(index, entry.pop(ENTRY), params)
        per_param[key] = entry
    return ({**state, "state": per_param} if "state" in state else state), found


def _all_kept(shape, device) -> Mask:
    # every word's bits set (Mask clears those past each row's last column): no weight unpacked
    return Mask(torch.full(packed_shape(shape), -1, dtype=torch.int32, device=device), shape)


def param_at(i, params: list[Tensor]) -> Tensor:
    """params[i], or a ValueError naming a state dict's mask for a parameter this optimizer lacks."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
        raise ValueError(f"state_dict has a mask for parameter {i!r}, but this optimizer "
                         f"holds parameters 0..{len(params) - 1}")
    return params[i]


def mask_from_entry(i, words, params: list[Tensor]) -> Mask | None:
    """The Mask of parameter i's "mask" entry (None where it keeps every weight)."""
    local = local_tensor(param_at(i, params))
    words = local_tensor(words) if isinstance(words, Tensor) else words
    want = packed_shape(local.shape)
    if not isinstance(words, Tensor) or words.dtype != torch.int32 or tuple(words.shape) != want:
        got = f"{words.dtype} {tuple(words.shape)}" if isinstance(words, Tensor) else type(words).__name__
        raise ValueError(f"state_dict's mask of parameter {i} is {got}; parameter {i} "
                         f"({tuple(local.shape)} here) needs int32 words of shape {want}")
    mask = Mask(words.to(local.device).contiguous(), local.shape)
    return None if torch.equal(mask.packed, _all_kept(local.shape, local.device).packed) else mask
