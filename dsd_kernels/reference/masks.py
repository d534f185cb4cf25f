"""Reference bit packing: 1 bit per weight, LSB first, in int32 words.

A tensor of 2 or more dims is viewed as (rows = shape[0], cols = numel // rows);
anything else as one row. Word j of a row holds columns 32*j .. 32*j+31, column
32*j+i in bit i. Padding bits past the last column are 0.
"""
from __future__ import annotations

import torch


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    numel = 1
    for d in shape:
        numel *= d
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool tensor -> int32 words of shape (rows, ceil(cols / 32))."""
    rows, cols = _rows_cols(keep.shape)
    words = (cols + 31) // 32
    bits = torch.zeros(rows, words * 32, dtype=torch.int64, device=keep.device)
    bits[:, :cols] = keep.reshape(rows, cols).long()
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64, device=keep.device)
    unsigned = (bits.reshape(rows, words, 32) * weights).sum(-1)
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """int32 words -> bool tensor of `shape`."""
    rows, cols = _rows_cols(torch.Size(shape))
    unsigned = packed.to(torch.int64) % 2**32
    shifts = torch.arange(32, dtype=torch.int64, device=packed.device)
    bits = (unsigned.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, packed.shape[-1] * 32)[:, :cols].bool().reshape(shape)
