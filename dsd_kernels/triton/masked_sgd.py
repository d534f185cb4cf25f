"""Fused multi-tensor masked SGD step: one launch per dtype for a whole param group.

Per element, in one pass over memory (torch.optim.SGD's arithmetic, computed in fp32,
or fp64 for fp64 params, op for op as torch's foreach kernels: each `x.add_(y, alpha=a)`
one fused multiply-add; bits not yet compared with torch on a GPU, and the CPU interpreter
does not round tl.fma as hardware does):
    g = keep ? grad : 0;  g = maximize ? -g : g;  g = fma(p, weight_decay, g)
    b = first ? g : fma(g, 1 - dampening, round(b * momentum));  g = nesterov ? fma(b, momentum, g) : b
    p = keep ? fma(g, -lr, p) : 0;  b = keep ? b : 0
Pruned weights and their momentum are written as exactly 0 whatever the gradient holds
(NaN/inf included), so momentum can never revive a pruned weight.

Launches per call: 1 per dtype present. Bytes per element: read p, g (+ b) and 1/8 of
a mask byte, write p (+ b): 4 * (3 + 2) + 1/8 = 20.125 B for fp32 with momentum.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._tiles import (TABLE_NUM_WARPS, TL_FLOAT, by_dtype, launch, segment_layout, tile_coords,
                     tile_segment, tile_table, tile_words_for)

# columns of the int64 segment table (one row per tensor)
SEG_PARAM = tl.constexpr(0)  # pointers to the parameter, gradient, momentum buffer, mask words
SEG_GRAD = tl.constexpr(1)
SEG_BUFFER = tl.constexpr(2)
SEG_MASK = tl.constexpr(3)
SEG_COLS = tl.constexpr(4)
SEG_WORDS_PER_ROW = tl.constexpr(5)
SEG_WORDS = tl.constexpr(6)
SEG_FLAGS = tl.constexpr(7)  # HAS_MASK | FIRST_STEP
SEG_COLUMNS = tl.constexpr(8)
HAS_MASK = tl.constexpr(1)  # the tensor has mask words (else dense)
FIRST_STEP = tl.constexpr(2)  # its momentum buffer starts as the gradient


@triton.jit
def _masked_sgd_kernel(SEG_META, TILES, HYPER, VALUE_TYPE: tl.constexpr,
                       COMPUTE_TYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                       TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    meta = SEG_META + seg * SEG_COLUMNS
    P = tl.load(meta + SEG_PARAM).to(tl.pointer_type(VALUE_TYPE))
    G = tl.load(meta + SEG_GRAD).to(tl.pointer_type(VALUE_TYPE))
    B = tl.load(meta + SEG_BUFFER).to(tl.pointer_type(VALUE_TYPE))
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    flags = tl.load(meta + SEG_FLAGS)
    offsets, valid, word = tile_coords(TILES, pid, tl.load(meta + SEG_COLS),
                                       tl.load(meta + SEG_WORDS_PER_ROW), num_words, TILE_WORDS)
    lr = tl.load(HYPER + 0).to(COMPUTE_TYPE)
    momentum = tl.load(HYPER + 1).to(COMPUTE_TYPE)
    undamped = tl.load(HYPER + 2).to(COMPUTE_TYPE)  # 1 - dampening, computed in fp64 as torch does
    weight_decay = tl.load(HYPER + 3).to(COMPUTE_TYPE)

    # a dense tensor (no mask) reads no mask words: all bits set
    mask_words = tl.where((flags & HAS_MASK) != 0, num_words, 0)
    words = tl.load(W + word, mask=word < mask_words, other=-1)
    keep = ((words >> tl.arange(0, 32)[None, :]) & 1) != 0
    p = tl.load(P + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    g = tl.load(G + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    g = tl.where(keep, g, 0.0)
    if MAXIMIZE:
        g = -g
    # torch's op sequence, each `x.add_(y, alpha=a)` one fused multiply-add, as its kernels
    if WEIGHT_DECAY:
        g = tl.fma(p, weight_decay, g)
    if MOMENTUM:
        b = tl.load(B + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
        b = tl.where((flags & FIRST_STEP) != 0, g, tl.fma(g, undamped, b * momentum))
        if NESTEROV:
            g = tl.fma(b, momentum, g)
        else:
            g = b
        tl.store(B + offsets, tl.where(keep, b, 0.0).to(VALUE_TYPE), mask=valid)
    p = tl.where(keep, tl.fma(g, -lr, p), 0.0)
    tl.store(P + offsets, p.to(VALUE_TYPE), mask=valid)


@lru_cache(maxsize=64)
def _cached_tiles(num_words: tuple[int, ...], tile_words: int, device: torch.device):
    return tile_table(list(num_words), tile_words, device)[0]


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize, torch_fused=False,
                tile_words: int | None = None) -> None:
    """Same contract as composite.masked_sgd_: contiguous tensors on one device; mask_words[i]
    int32 (rows, ceil(cols/32)) or None; momentum_buffers/first_step empty when momentum == 0.
    One arithmetic for both of SGD's (torch_fused is accepted and changes nothing): torch's
    op sequence computed in fp32 (fp64 for fp64), not checked bit for bit on a GPU yet."""
    if not params:
        return
    device = params[0].device
    tile_words = tile_words_for(device, tile_words, gpu_default=32)
    hyper = torch.tensor([float(lr), momentum, 1 - dampening, weight_decay], dtype=torch.float64,
                         device=device)
    for dtype, index in by_dtype(params).items():
        rows, num_words = [], []
        for i in index:
            cols, words_per_row, n_words = segment_layout(params[i])
            words = mask_words[i]
            flags = (HAS_MASK.value if words is not None else 0) | (
                FIRST_STEP.value if momentum != 0 and first_step[i] else 0)
            rows.append([params[i].data_ptr(), grads[i].data_ptr(),
                         momentum_buffers[i].data_ptr() if momentum != 0 else params[i].data_ptr(),
                         words.data_ptr() if words is not None else params[i].data_ptr(),
                         cols, words_per_row, n_words, flags])
            num_words.append(n_words)
        tiles = _cached_tiles(tuple(num_words), tile_words, device)
        if tiles.shape[0] == 0:
            continue
        meta = torch.tensor(rows, dtype=torch.int64).to(device)
        launch(_masked_sgd_kernel, (tiles.shape[0],), num_warps=TABLE_NUM_WARPS)(
            meta, tiles, hyper, VALUE_TYPE=TL_FLOAT[dtype],
            COMPUTE_TYPE=tl.float64 if dtype == torch.float64 else tl.float32,
            MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            WEIGHT_DECAY=weight_decay != 0, TILE_WORDS=tile_words)
