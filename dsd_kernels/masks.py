"""Mask: a packed 1-bit-per-weight mask (1 = weight kept, 0 = pruned).

Layout (DESIGN.md): int32 words, LSB first, `packed` of shape (rows, ceil(cols / 32)),
rows = shape[0] for tensors of 2 or more dims (1 otherwise), cols = numel // rows.
Padding bits past the last column are always 0, so counts and comparisons are exact.
"""
from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_BYTE_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def mask_rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the packed layout for a weight of `shape`."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def packed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(rows, ceil(cols / 32)): the shape of the packed int32 words of a weight of `shape`."""
    rows, cols = mask_rows_cols(shape)
    return rows, (cols + 31) // 32


def _padding_free(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """packed with the bits past column `cols` of each row's last word cleared (a copy only
    where some were set), so equal masks have equal words."""
    used = cols % 32
    if used == 0 or packed.numel() == 0 or packed.device.type == "meta":
        return packed
    valid = (1 << used) - 1  # < 2**31: fits an int32
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph: always cleared
        return torch.cat([packed[:, :-1], packed[:, -1:] & valid], dim=1)
    if not bool((packed[:, -1] & ~valid).any()):
        return packed
    packed = packed.clone()
    packed[:, -1] &= valid
    return packed


def pack_bool(keep: torch.Tensor) -> torch.Tensor:
    """bool tensor -> int32 words (rows, ceil(cols / 32)), LSB first.

    Bytes are packed 8 bits at a time and four little-endian bytes viewed as one
    int32 word, which puts column 32*j + i at bit i of word j.
    """
    rows, cols = mask_rows_cols(keep.shape)
    words = packed_shape(keep.shape)[1]
    if rows * words == 0:
        return torch.zeros(rows, words, dtype=torch.int32, device=keep.device)
    bits = torch.zeros(rows, words * 32, dtype=torch.uint8, device=keep.device)
    bits[:, :cols] = keep.reshape(rows, cols)
    weights = _BYTE_WEIGHTS.to(keep.device)
    packed_bytes = (bits.reshape(rows, words * 4, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed_bytes.view(torch.int32).reshape(rows, words)


def unpack_bool(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """int32 words -> bool tensor of `shape`."""
    rows, cols = mask_rows_cols(shape)
    if packed.numel() == 0:
        return torch.zeros(shape, dtype=torch.bool, device=packed.device)
    as_bytes = packed.contiguous().view(torch.uint8).reshape(rows, -1, 1)
    bits = (as_bytes & _BYTE_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(rows, packed.shape[-1] * 32)[:, :cols].reshape(shape)


class Mask:
    """A packed binary mask for one weight tensor (True/1 = kept).

    >>> m = Mask.from_bool(w != 0)
    >>> m.apply_(w)            # zero the pruned weights in place
    >>> m.count(), m.sparsity  # kept weights, pruned fraction
    """

    __slots__ = ("packed", "shape")

    def __init__(self, packed: torch.Tensor, shape: torch.Size | tuple[int, ...]):
        """packed: int32 words in the layout above (a non-contiguous view is copied; bits past
        the last column are cleared); shape: the weight's shape (non-negative ints)."""
        try:
            shape = torch.Size(shape)
        except (TypeError, ValueError) as err:
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from err
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must have non-negative sizes, got {tuple(shape)}")
        expected = packed_shape(shape)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
            raise TypeError(f"packed must be an int32 tensor, got {type(packed).__name__} "
                            f"{getattr(packed, 'dtype', '')}")
        if tuple(packed.shape) != expected:
            raise ValueError(f"packed has shape {tuple(packed.shape)}, expected {expected} for a "
                             f"mask of shape {tuple(shape)}")
        self.packed = _padding_free(packed.contiguous(), mask_rows_cols(shape)[1])
        self.shape = shape

    # construction and conversion
    @classmethod
    def from_bool(cls, keep: torch.Tensor) -> "Mask":
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"keep must be a tensor, got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
        return cls(pack_bool(keep), keep.shape)

    def to_bool(self) -> torch.Tensor:
        """The mask unpacked: a bool tensor of `shape`, True where kept."""
        return unpack_bool(self.packed, self.shape)

    @property
    def device(self) -> torch.device:
        """The device of the packed words."""
        return self.packed.device

    @property
    def numel(self) -> int:
        """Number of weights the mask covers (kept and pruned)."""
        return math.prod(self.shape)

    def count(self) -> int:
        """Number of kept weights."""
        return int(self.to_bool().sum()) if self.numel else 0

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights (0.0 for an empty mask)."""
        return 1.0 - self.count() / self.numel if self.numel else 0.0

    def apply_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Zero the pruned entries of `tensor` in place (NaN/inf there become 0 too)."""
        if tuple(tensor.shape) != tuple(self.shape):
            raise ValueError(f"tensor has shape {tuple(tensor.shape)}, mask has {tuple(self.shape)}")
        return tensor.masked_fill_(~self.to_bool().to(tensor.device), 0)

    def to(self, device) -> "Mask":
        """The same mask with its packed words on `device`."""
        return Mask(self.packed.to(device), self.shape)

    def clone(self) -> "Mask":
        """A mask with its own copy of the packed words."""
        return Mask(self.packed.clone(), self.shape)

    # serialisation: plain tensors and ints, so torch.load(weights_only=True) reads it
    def state_dict(self) -> dict:
        """{"packed": the int32 words, "shape": list}: what from_state_dict reads back."""
        return {"packed": self.packed, "shape": list(self.shape)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Mask":
        if not isinstance(state, dict):
            raise TypeError(f"a Mask state_dict must be a dict, got {type(state).__name__}")
        missing = [key for key in ("packed", "shape") if key not in state]
        if missing:
            raise ValueError(f"Mask state_dict lacks {', '.join(map(repr, missing))} (has "
                             f"{sorted(map(str, state))})")
        return cls(state["packed"], state["shape"])

    def __getstate__(self):
        return self.state_dict()

    def __setstate__(self, state):
        restored = Mask.from_state_dict(state)
        self.packed, self.shape = restored.packed, restored.shape

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.shape == other.shape and torch.equal(self.packed.cpu(), other.packed.cpu())

    __hash__ = None

    def __repr__(self) -> str:
        return (f"Mask(shape={tuple(self.shape)}, kept={self.count()}/{self.numel}, "
                f"device={self.device})")


def as_mask(mask, like: torch.Tensor, name: str = "mask") -> Mask:
    """A Mask for tensor `like`, on its device, from a Mask, a bool tensor (True = kept) or a
    floating tensor of 0s and 1s (1 = kept: what torch.nn.utils.prune keeps as weight_mask)."""
    if isinstance(mask, torch.Tensor):
        if mask.is_floating_point():
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{name} is a {mask.dtype} tensor with values other than 0 and 1")
            mask = mask != 0
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a Mask, a bool tensor or a 0/1 float tensor, got a "
                            f"{mask.dtype} tensor")
        mask = Mask.from_bool(mask)
    if not isinstance(mask, Mask):
        raise TypeError(f"{name} must be a Mask, a bool tensor or a 0/1 float tensor, got "
                        f"{type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but its parameter has shape "
                         f"{tuple(like.shape)}")
    return mask if mask.device == like.device else mask.to(like.device)


_DERIVED = WeakTensorKeyDictionary()  # packed words -> {(version, form): Mask}


def _derived(mask: Mask, form: tuple, build) -> Mask:
    """build(mask) cached per mask words, their version and `form` (a key naming the
    transform), so a step re-derives it only when the mask changes."""
    version = mask.packed._version
    cache = _DERIVED.get(mask.packed)
    if cache is None or any(k[0] != version for k in cache):  # drop forms of older versions
        cache = _DERIVED[mask.packed] = {k: v for k, v in (cache or {}).items() if k[0] == version}
    key = (version, tuple(mask.shape), form)
    if key not in cache:
        cache[key] = build(mask)
    return cache[key]


def permuted_mask(mask: Mask, dims: tuple[int, ...]) -> Mask:
    """The mask of `tensor.permute(dims)` (e.g. a channels_last weight in its memory order)."""
    return _derived(mask, ("permute", dims), lambda m: Mask.from_bool(m.to_bool().permute(dims).contiguous()))


def real_view_mask(mask: Mask) -> Mask:
    """The mask of `torch.view_as_real(tensor)` for a mask of a complex tensor: each complex
    element's mask bit covers both its real and imaginary parts."""
    return _derived(mask, ("real_view",), lambda m: Mask.from_bool(
        m.to_bool().unsqueeze(-1).expand(*m.shape, 2).contiguous()))


# torch.load(weights_only=True) accepts a pickled Mask once this package is imported
torch.serialization.add_safe_globals([Mask])
