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

Tiles of FLAT segments load and store 16-byte vectors (see _tiles.segment_flags).

Launches per call: 1 per dtype present. Bytes per element: read p, g (+ b) and 1/8 of
a mask byte, write p (+ b): 4 * (3 + 2) + 1/8 = 20.125 B for fp32 with momentum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (FLAT, HAS_MASK, TABLE_NUM_WARPS, TL_FLOAT, cached_table, flat_tile, launch, planned_tables,
                     segment_tables, segment_tile, tensor_pointers, tile_keep, tile_segment, tile_words_for)

# columns of the int64 segment table (one row per tensor)
SEG_PARAM = tl.constexpr(0)  # pointers to the parameter, gradient, momentum buffer, mask words
SEG_GRAD = tl.constexpr(1)
SEG_BUFFER = tl.constexpr(2)
SEG_MASK = tl.constexpr(3)
SEG_COLS = tl.constexpr(4)
SEG_WORDS_PER_ROW = tl.constexpr(5)
SEG_WORDS = tl.constexpr(6)
SEG_NUMEL = tl.constexpr(7)
SEG_FLAGS = tl.constexpr(8)  # HAS_MASK | FLAT (segment_flags) | FIRST_STEP
SEG_COLUMNS = tl.constexpr(9)
FIRST_STEP = tl.constexpr(4)  # its momentum buffer starts as the gradient
# mask words per program on a GPU (benchmarks/sweep_tile_words.py; results/NVIDIA-H200-tile-words.json)
GPU_TILE_WORDS = 32


@triton.jit
def _sgd_tile(meta, TILES, pid, W, num_words, mask_words, first_step, lr, momentum, undamped, weight_decay,
              VALUE_TYPE: tl.constexpr, COMPUTE_TYPE: tl.constexpr, MOMENTUM: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
              TILE_WORDS: tl.constexpr, FLAT: tl.constexpr):
    """The step of tile pid of the segment at meta (FLAT: see tensor_pointers)."""
    offsets, valid, word = segment_tile(TILES, pid, tl.load(meta + SEG_COLS), tl.load(meta + SEG_WORDS_PER_ROW),
                                        num_words, TILE_WORDS, FLAT)
    P = tensor_pointers(tl.load(meta + SEG_PARAM), offsets, VALUE_TYPE, FLAT)
    G = tensor_pointers(tl.load(meta + SEG_GRAD), offsets, VALUE_TYPE, FLAT)
    B = tensor_pointers(tl.load(meta + SEG_BUFFER), offsets, VALUE_TYPE, FLAT)
    keep = tile_keep(W, word, mask_words)
    p = tl.load(P, mask=valid, other=0).to(COMPUTE_TYPE)
    g = tl.load(G, mask=valid, other=0).to(COMPUTE_TYPE)
    g = tl.where(keep, g, 0.0)
    if MAXIMIZE:
        g = -g
    # torch's op sequence, each `x.add_(y, alpha=a)` one fused multiply-add, as its kernels
    if WEIGHT_DECAY:
        g = tl.fma(p, weight_decay, g)
    if MOMENTUM:
        b = tl.load(B, mask=valid, other=0).to(COMPUTE_TYPE)
        b = tl.where(first_step, g, tl.fma(g, undamped, b * momentum))
        if NESTEROV:
            g = tl.fma(b, momentum, g)
        else:
            g = b
        tl.store(B, tl.where(keep, b, 0.0).to(VALUE_TYPE), mask=valid)
    p = tl.where(keep, tl.fma(g, -lr, p), 0.0)
    tl.store(P, p.to(VALUE_TYPE), mask=valid)


@triton.jit
def _masked_sgd_kernel(SEG_META, TILES, HYPER, VALUE_TYPE: tl.constexpr,
                       COMPUTE_TYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                       TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    meta = SEG_META + seg * SEG_COLUMNS
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    flags = tl.load(meta + SEG_FLAGS)
    first_step = (flags & FIRST_STEP) != 0
    lr = tl.load(HYPER + 0).to(COMPUTE_TYPE)
    momentum = tl.load(HYPER + 1).to(COMPUTE_TYPE)
    undamped = tl.load(HYPER + 2).to(COMPUTE_TYPE)  # 1 - dampening, computed in fp64 as torch does
    weight_decay = tl.load(HYPER + 3).to(COMPUTE_TYPE)
    # a dense tensor (no mask) reads no mask words: all bits set
    mask_words = tl.where((flags & HAS_MASK) != 0, num_words, 0)

    if flat_tile(TILES, pid, (flags & FLAT) != 0, tl.load(meta + SEG_NUMEL), TILE_WORDS):
        _sgd_tile(meta, TILES, pid, W, num_words, mask_words, first_step, lr, momentum, undamped, weight_decay,
                  VALUE_TYPE, COMPUTE_TYPE, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, TILE_WORDS, True)
    else:
        _sgd_tile(meta, TILES, pid, W, num_words, mask_words, first_step, lr, momentum, undamped, weight_decay,
                  VALUE_TYPE, COMPUTE_TYPE, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, TILE_WORDS, False)


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize, torch_fused=False,
                tile_words: int | None = None, static_key=None) -> None:
    """Same contract as backends/torch/masked_sgd.masked_sgd_: contiguous tensors on one device;
    mask_words[i] int32 (rows, ceil(cols/32)) or None; momentum_buffers/first_step empty when
    momentum == 0. One arithmetic for both of SGD's (torch_fused is accepted and changes nothing):
    torch's op sequence computed in fp32 (fp64 for fp64), not checked bit for bit on a GPU yet.
    static_key: see _tiles.planned_tables (the gradients and first_step may change)."""
    if not params:
        return
    device = params[0].device
    tile_words = tile_words_for(device, tile_words, gpu_default=GPU_TILE_WORDS)
    hyper = cached_table([float(lr), momentum, 1 - dampening, weight_decay], torch.float64, device)

    def tables():
        return segment_tables(
            params, mask_words, lambda i: [params[i].data_ptr(), grads[i].data_ptr(),
                                           momentum_buffers[i].data_ptr() if momentum != 0 else params[i].data_ptr()],
            tile_words, device, extra_flags=lambda i: FIRST_STEP.value if momentum != 0 and first_step[i] else 0)

    varying = ((tuple(g.data_ptr() for g in grads), tuple(first_step), momentum != 0, tile_words)
               if static_key is not None else ())
    for dtype, _, tiles, meta in planned_tables(static_key, varying, tables):
        launch(_masked_sgd_kernel, (tiles.shape[0],), num_warps=TABLE_NUM_WARPS)(
            meta, tiles, hyper, VALUE_TYPE=TL_FLOAT[dtype],
            COMPUTE_TYPE=tl.float64 if dtype == torch.float64 else tl.float32,
            MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            WEIGHT_DECAY=weight_decay != 0, TILE_WORDS=tile_words)
