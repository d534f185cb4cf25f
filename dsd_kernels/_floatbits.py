"""Order-preserving integer keys of |w| for every float dtype.

Clearing the sign bit of an IEEE float gives an unsigned integer that grows with |w|
(so -0.0 and 0.0 share key 0, denormals sit just above 0, +inf at the exponent-all-ones
pattern). Every NaN payload is clamped to one key just above +inf, so NaNs tie with
each other and rank above +inf, as the selection contract requires.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeySpec:
    int_dtype: torch.dtype  # same width as the float, for .view()
    key_bits: int  # bits of the key (all but the sign bit)
    abs_mask: int
    nan_key: int  # key of every NaN: +inf's key + 1

    @property
    def inf_key(self) -> int:
        return self.nan_key - 1


KEY_SPECS: dict[torch.dtype, KeySpec] = {
    torch.float16: KeySpec(torch.int16, 15, 0x7FFF, 0x7C01),
    torch.bfloat16: KeySpec(torch.int16, 15, 0x7FFF, 0x7F81),
    torch.float32: KeySpec(torch.int32, 31, 0x7FFFFFFF, 0x7F800001),
    torch.float64: KeySpec(torch.int64, 63, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001),
}


def magnitude_keys(t: torch.Tensor) -> torch.Tensor:
    """Flat integer keys of |t| (int32 for 16/32-bit floats, int64 for float64)."""
    spec = KEY_SPECS[t.dtype]
    key = t.detach().reshape(-1).view(spec.int_dtype) & spec.abs_mask
    if spec.int_dtype == torch.int16:
        key = key.int()
    return key.clamp_(max=spec.nan_key)


def keys_to_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of magnitude_keys for non-negative keys: the float |w| each key stands for."""
    spec = KEY_SPECS[dtype]
    return keys.to(spec.int_dtype).view(dtype)


def digit_widths(key_bits: int, max_digit_bits: int) -> list[int]:
    """Split key_bits into near-equal radix digits of at most max_digit_bits, most significant first."""
    passes = -(-key_bits // max_digit_bits)
    base, extra = divmod(key_bits, passes)
    return [base + 1] * extra + [base] * (passes - extra)
