"""Masks as per-parameter optimizer state entries, the form torch.distributed.checkpoint (DCP)
saves and reshards: "mask" holds a parameter's packed keep-bits as bytes (uint8 (rows,
4 * ceil(cols / 32)): the Mask's int32 words viewed as their little-endian bytes, bit j of byte b
= column 8b + j kept; every bit set where it has no mask). Bytes, not the words themselves,
because a plain torch optimizer that loads a state dict casts every state tensor to its
parameter's dtype (torch.optim.Optimizer.load_state_dict) and hands it back on its next
state_dict(): every byte value survives that cast exactly (bf16 holds the integers to 256),
an int32 word does not (fp32 rounds it past 2**24), so MaskedAdamW -> AdamW -> MaskedAdamW
keeps the masks. Such a cast entry is read back where its values are exactly 0..255; int32
words of the earlier format are still read. For a parameter FSDP2 shards by rows (Shard(0), or
replicated) the bytes are a DTensor placed the same way, so DCP splits them with the rows on
any world size. Every parameter of 2 or more dims that can take a
mask carries the entry, so that a fresh optimizer's state dict, DCP's template for loading, names
them all. MaskedSGD and MaskedAdamW write them in their state_dict; OptimizerMasks adds them to
any optimizer's through its state-dict hooks."""
from __future__ import annotations

import torch
from torch import Tensor

from .._dtensor import Replicate, Shard, is_dtensor, local_tensor
from ..masks import Mask, as_mask, packed_shape

ENTRY = "mask"


def can_carry_mask(p: Tensor) -> bool:
    return p.dim() >= 2 and (p.is_floating_point() or p.is_complex())


def check_can_carry(p: Tensor, what: str) -> None:
    """A ValueError naming `what` where p cannot have a mask: masks are for floating weights of
    2 or more dims, the parameters whose state dict entries carry them."""
    if not can_carry_mask(p):
        raise ValueError(f"{what} is for a {p.dim()}-dim {p.dtype} parameter of shape {tuple(p.shape)}: masks "
                         f"are for floating weights of 2 or more dims (biases and norm scales are never pruned, "
                         f"and a state dict carries no mask for them)")


def checked_masks(masks: dict, params: list[Tensor]) -> dict:
    """set_masks' argument checked: {param: Mask} for parameters in `params` that can carry a
    mask, each mask as the parameter's (local shard's) Mask; a ValueError or TypeError naming
    the parameter by its index otherwise, before anything changes."""
    index = {id(p): i for i, p in enumerate(params)}
    checked = {}
    for p, m in masks.items():
        if not isinstance(p, Tensor) or id(p) not in index:
            raise ValueError("set_masks got a mask for a tensor the optimizer does not hold")
        what = f"set_masks: the mask of parameter {index[id(p)]}"
        check_can_carry(p, what)
        checked[p] = as_mask(m, local_tensor(p), what)  # a sharded param's mask covers its local shard
    return checked


def mask_entry(p: Tensor, mask: Mask | None):
    """The "mask" state entry of parameter p with `mask` (None: unmasked, every bit set); None
    where p takes none (under 2 dims; a sharded p placed otherwise than by rows, unmasked)."""
    if not can_carry_mask(p):
        return None
    local = local_tensor(p)
    words = mask.packed if mask is not None else _all_kept(local.shape, local.device).packed
    words = words.view(torch.uint8)  # (rows, 4 * words per row): see the module docstring
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
                              shape=torch.Size((rows, 4 * words_per_row)), stride=(4 * words_per_row, 1))


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


def _exact_bytes(values: Tensor) -> bool:
    """Whether every value is exactly an integer in 0..255 (a byte, or a byte cast to a float)."""
    if values.dtype == torch.uint8:
        return True
    if values.dtype == torch.bool:
        return False
    exact = (values >= 0) & (values <= 255)
    if values.is_floating_point():
        exact &= values == values.round()
    return bool(exact.all())


def _all_kept(shape, device) -> Mask:
    # every word's bits set (Mask clears those past each row's last column): no weight unpacked
    return Mask(torch.full(packed_shape(shape), -1, dtype=torch.int32, device=device), shape)


def param_at(i, params: list[Tensor]) -> Tensor:
    """params[i], or a ValueError naming a state dict's mask for a parameter this optimizer lacks."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
        raise ValueError(f"state_dict has a mask for parameter {i!r}, but this optimizer "
                         f"holds parameters 0..{len(params) - 1}")
    return params[i]


def mask_from_entry(i, entry, params: list[Tensor]) -> Mask | None:
    """The Mask of parameter i's "mask" entry (None where it keeps every weight): bytes (uint8, or
    any dtype a torch optimizer cast them to, holding exactly 0..255) or int32 words (the format
    before bytes), of the parameter's (local shard's) packed shape."""
    param = param_at(i, params)
    check_can_carry(param, f"state_dict's mask of parameter {i}")
    local = local_tensor(param)
    entry = local_tensor(entry) if isinstance(entry, Tensor) else entry
    rows, words_per_row = packed_shape(local.shape)
    words = None
    if isinstance(entry, Tensor) and entry.dtype == torch.int32 and tuple(entry.shape) == (rows, words_per_row):
        words = entry
    elif isinstance(entry, Tensor) and tuple(entry.shape) == (rows, 4 * words_per_row):
        values = entry
        if entry.is_complex():  # cast to a complex parameter's dtype: the bytes are the real parts
            values = entry.real if bool((entry.imag == 0).all()) else None
        if values is not None and _exact_bytes(values):
            words = values.to(torch.uint8).clone(memory_format=torch.contiguous_format).view(torch.int32)
    if words is None:
        got = f"{entry.dtype} {tuple(entry.shape)}" if isinstance(entry, Tensor) else type(entry).__name__
        raise ValueError(f"state_dict's mask of parameter {i} is {got}; parameter {i} ({tuple(local.shape)} "
                         f"here) needs bytes of shape {(rows, 4 * words_per_row)} (uint8, or values exactly "
                         f"0..255 where an optimizer cast them) or int32 words of shape {(rows, words_per_row)}")
    mask = Mask(words.to(local.device).contiguous(), local.shape)
    return None if torch.equal(mask.packed, _all_kept(local.shape, local.device).packed) else mask
