"""Fused multi-tensor masked AdamW step: one launch per dtype for a whole param group.

Per element, in one pass over memory, torch.optim.AdamW's single-tensor/foreach op sequence in
fp32 (fp64 for fp64 params), each rounding where torch's ops round (bits not yet compared with
torch on a GPU):
    g = maximize ? -grad : grad;  x = p * (1 - lr*wd)
    m = fma(1 - beta1, g - m, m)   (lerp; beta1 < 0.5: fma(-(g - m), beta1, g))
    v = fma((1 - beta2) * g, g, v * beta2);  vmax = max(vmax, v) (NaN wins)
    p = x + (-step_size * m) / (sqrt(v or vmax) / sqrt(bias_correction2) + eps)
with IEEE square root and division (tl.sqrt_rn, tl.div_rn), as torch's CUDA kernels compute
them. Pruned weights, exp_avg, exp_avg_sq (and max_exp_avg_sq) are written as exactly +0,
whatever the gradient held there. step_size = lr / bias_correction1 and sqrt(bias_correction2)
come per tensor (each has its own step count) from a float64 table.

Launches per call: 1 per dtype present. Bytes per element: read p, g, m, v and 1/8 of a mask
byte, write p, m, v: 4 * 7 + 1/8 = 28.125 B for fp32 (36.125 B with amsgrad).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .._adamw_steps import advance_steps
from ._tiles import (TABLE_NUM_WARPS, TL_FLOAT, by_dtype, launch, segment_layout, tile_coords,
                     tile_segment, tile_table, tile_words_for)

# columns of the int64 segment table (one row per tensor)
SEG_PARAM = tl.constexpr(0)  # pointers to the parameter, gradient, moments, max moment, mask words
SEG_GRAD = tl.constexpr(1)
SEG_EXP_AVG = tl.constexpr(2)
SEG_EXP_AVG_SQ = tl.constexpr(3)
SEG_MAX_EXP_AVG_SQ = tl.constexpr(4)
SEG_MASK = tl.constexpr(5)
SEG_COLS = tl.constexpr(6)
SEG_WORDS_PER_ROW = tl.constexpr(7)
SEG_WORDS = tl.constexpr(8)
SEG_HAS_MASK = tl.constexpr(9)  # 1: the tensor has mask words (else dense)
SEG_COLUMNS = tl.constexpr(10)
# columns of the float64 per-tensor table
STEP_NEG_SIZE = tl.constexpr(0)  # -lr / bias_correction1
STEP_BC2_SQRT = tl.constexpr(1)  # sqrt(bias_correction2)
STEP_COLUMNS = tl.constexpr(2)
# HYPER: 1 - lr*wd, 1 - beta1, beta1 (= 1 - (1 - beta1) as torch's lerp takes it), beta2, 1 - beta2, eps


@triton.jit
def _masked_adamw_kernel(SEG_META, TILES, HYPER, STEPS, VALUE_TYPE: tl.constexpr, COMPUTE_TYPE: tl.constexpr,
                         AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         SMALL_WEIGHT: tl.constexpr, FP64: tl.constexpr, TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    meta = SEG_META + seg * SEG_COLUMNS
    P = tl.load(meta + SEG_PARAM).to(tl.pointer_type(VALUE_TYPE))
    G = tl.load(meta + SEG_GRAD).to(tl.pointer_type(VALUE_TYPE))
    M = tl.load(meta + SEG_EXP_AVG).to(tl.pointer_type(VALUE_TYPE))
    V = tl.load(meta + SEG_EXP_AVG_SQ).to(tl.pointer_type(VALUE_TYPE))
    VMAX = tl.load(meta + SEG_MAX_EXP_AVG_SQ).to(tl.pointer_type(VALUE_TYPE))
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    offsets, valid, word = tile_coords(TILES, pid, tl.load(meta + SEG_COLS),
                                       tl.load(meta + SEG_WORDS_PER_ROW), num_words, TILE_WORDS)
    decay = tl.load(HYPER + 0).to(COMPUTE_TYPE)
    avg_weight = tl.load(HYPER + 1).to(COMPUTE_TYPE)
    avg_keep = tl.load(HYPER + 2).to(COMPUTE_TYPE)
    beta2 = tl.load(HYPER + 3).to(COMPUTE_TYPE)
    sq_weight = tl.load(HYPER + 4).to(COMPUTE_TYPE)
    eps = tl.load(HYPER + 5).to(COMPUTE_TYPE)
    neg_step = tl.load(STEPS + seg * STEP_COLUMNS + STEP_NEG_SIZE).to(COMPUTE_TYPE)
    bc2_sqrt = tl.load(STEPS + seg * STEP_COLUMNS + STEP_BC2_SQRT).to(COMPUTE_TYPE)

    # a dense tensor (no mask) reads no mask words: all bits set
    mask_words = tl.where(tl.load(meta + SEG_HAS_MASK) != 0, num_words, 0)
    words = tl.load(W + word, mask=word < mask_words, other=-1)
    keep = ((words >> tl.arange(0, 32)[None, :]) & 1) != 0
    g = tl.load(G + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    if MAXIMIZE:
        g = -g
    x = tl.load(P + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    if WEIGHT_DECAY:
        x = x * decay
    m = tl.load(M + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    diff = g - m
    if SMALL_WEIGHT:
        m = tl.fma(avg_weight, diff, m)
    else:
        m = tl.fma(-diff, avg_keep, g)
    v = tl.load(V + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
    v = tl.fma(sq_weight * g, g, v * beta2)
    second = v
    if AMSGRAD:
        old = tl.load(VMAX + offsets, mask=valid, other=0).to(COMPUTE_TYPE)
        second = tl.where((old > v) | (old != old), old, v)  # torch.maximum: NaN wins
        tl.store(VMAX + offsets, tl.where(keep, second, 0.0).to(VALUE_TYPE), mask=valid)
    if FP64:  # fp64 sqrt and division are IEEE-rounded already (tl.*_rn take fp32 only)
        denom = tl.sqrt(second) / bc2_sqrt + eps
        p = x + (neg_step * m) / denom
    else:  # fp32 `/` and tl.sqrt would be the fast approximations on a GPU
        denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
        p = x + tl.div_rn(neg_step * m, denom)
    tl.store(P + offsets, tl.where(keep, p, 0.0).to(VALUE_TYPE), mask=valid)
    tl.store(M + offsets, tl.where(keep, m, 0.0).to(VALUE_TYPE), mask=valid)
    tl.store(V + offsets, tl.where(keep, v, 0.0).to(VALUE_TYPE), mask=valid)


# no contraction of a multiply and a later add into one fma where torch rounds between them
# (p * (1 - lr*wd), then + the update); the explicit tl.fma calls stay fused
LAUNCH_OPTIONS = dict(num_warps=TABLE_NUM_WARPS, enable_fp_fusion=False)


@lru_cache(maxsize=64)
def _cached_tiles(num_words: tuple[int, ...], tile_words: int, device: torch.device):
    return tile_table(list(num_words), tile_words, device)[0]


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, torch_fused=False,
                  tile_words: int | None = None) -> None:
    """Same contract as composite.masked_adamw_: contiguous fp32/fp64 tensors on one device;
    mask_words[i] int32 (rows, ceil(cols/32)) or None; state_steps incremented here. One
    arithmetic for both of AdamW's (torch_fused is accepted and changes nothing)."""
    if not params:
        return
    device = params[0].device
    tile_words = tile_words_for(device, tile_words, gpu_default=32)
    step_sizes, bias_correction2_sqrts = advance_steps(state_steps, lr, beta1, beta2)
    for dtype, index in by_dtype(params).items():
        rows, num_words = [], []
        # lerp's weight as the kernel rounds it, and its other branch's 1 - weight from it
        # (1 - w in fp64 is exact: rounded to fp32 by the kernel, it is fp32's 1.0f - w)
        weight = float(torch.tensor(1 - beta1, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
        hyper = torch.tensor([1 - lr * weight_decay, 1 - beta1, 1 - weight, beta2, 1 - beta2, eps],
                             dtype=torch.float64, device=device)
        for i in index:
            cols, words_per_row, n_words = segment_layout(params[i])
            words = mask_words[i]
            rows.append([params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(),
                         max_exp_avg_sqs[i].data_ptr() if amsgrad else params[i].data_ptr(),
                         words.data_ptr() if words is not None else params[i].data_ptr(),
                         cols, words_per_row, n_words, int(words is not None)])
            num_words.append(n_words)
        tiles = _cached_tiles(tuple(num_words), tile_words, device)
        if tiles.shape[0] == 0:
            continue
        meta = torch.tensor(rows, dtype=torch.int64).to(device)
        step_table = torch.tensor([[-step_sizes[i], bias_correction2_sqrts[i]] for i in index],
                                  dtype=torch.float64).to(device)
        launch(_masked_adamw_kernel, (tiles.shape[0],), **LAUNCH_OPTIONS)(
            meta, tiles, hyper, step_table, VALUE_TYPE=TL_FLOAT[dtype],
            COMPUTE_TYPE=tl.float64 if dtype == torch.float64 else tl.float32, AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, SMALL_WEIGHT=abs(weight) < 0.5,
            FP64=dtype == torch.float64, TILE_WORDS=tile_words)
