"""Fused multi-tensor masked AdamW step: one launch per dtype for a whole param group.

Per element, in one pass over memory, torch.optim.AdamW's foreach op sequence in fp32 (fp64
for fp64 params), each rounding where torch's kernels round on the tensors' device:
    g = maximize ? -grad : grad;  x = p * (1 - lr*wd)
    m = fma(1 - beta1, g - m, m)   (lerp; beta1 < 0.5: fma(-(g - m), beta1, g))
    CUDA: v = fma(1 - beta2, g * g, v * beta2);  p = fma(-step_size, m / denom, x)
    CPU:  v = fma((1 - beta2) * g, g, v * beta2);  p = x + (-step_size * m) / denom
    vmax = max(vmax, v) (NaN wins);  denom = sqrt(v or vmax) / sqrt(bias_correction2) + eps
with IEEE square root and division (tl.sqrt_rn, tl.div_rn) and no other contraction. On an
H200 (torch 2.11, triton 3.6) the CUDA order gives torch.optim.AdamW(foreach=True)'s bits
exactly (tests/test_gpu.py; benchmarks/results/NVIDIA-H200-gpu-tests.txt); torch's
single-tensor CUDA kernels round otherwise (division by a scalar as a multiplication by its
reciprocal), which is why MaskedAdamW(foreach=False) takes torch's own step on CUDA. Pruned
weights, exp_avg, exp_avg_sq (and max_exp_avg_sq) are written as exactly +0, whatever the
gradient held there. step_size = lr / bias_correction1 and sqrt(bias_correction2) come per
tensor (each has its own step count) from a float64 table.

Tiles of FLAT segments (_tiles.segment_flags) address their elements as word * 32 + bit with
alignment hints, so their loads and stores are 16-byte vectors; other tiles take the general
row/column path (both give the same bits: tests/test_triton_flat_tiles.py).

Launches per call: 1 per dtype present. Bytes per element: read p, g, m, v and 1/8 of a mask
byte, write p, m, v: 4 * 7 + 1/8 = 28.125 B for fp32 (36.125 B with amsgrad).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._adamw_steps import advance_steps
from ._tiles import (FLAT, HAS_MASK, TABLE_NUM_WARPS, TL_FLOAT, cached_table, flat_tile, host_table, launch,
                     planned_tables, segment_tables, segment_tile, tensor_pointers, tile_keep, tile_segment,
                     tile_words_for)

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
SEG_NUMEL = tl.constexpr(9)
SEG_FLAGS = tl.constexpr(10)  # HAS_MASK | FLAT (segment_flags)
SEG_COLUMNS = tl.constexpr(11)
# columns of the float64 per-tensor table
STEP_NEG_SIZE = tl.constexpr(0)  # -lr / bias_correction1
STEP_BC2_SQRT = tl.constexpr(1)  # sqrt(bias_correction2)
STEP_COLUMNS = tl.constexpr(2)
# mask words per program on a GPU (benchmarks/sweep_tile_words.py; results/NVIDIA-H200-tile-words.json)
GPU_TILE_WORDS = 32
# HYPER: 1 - lr*wd, 1 - beta1, beta1 (= 1 - (1 - beta1) as torch's lerp takes it), beta2, 1 - beta2, eps


@triton.jit
def _adamw_tile(meta, TILES, pid, W, num_words, mask_words, decay, avg_weight, avg_keep, beta2, sq_weight, eps,
                neg_step, bc2_sqrt, VALUE_TYPE: tl.constexpr, COMPUTE_TYPE: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                SMALL_WEIGHT: tl.constexpr, FP64: tl.constexpr, CUDA_FOREACH: tl.constexpr,
                TILE_WORDS: tl.constexpr, FLAT: tl.constexpr):
    """The step of tile pid of the segment at meta (FLAT: see tensor_pointers)."""
    offsets, valid, word = segment_tile(TILES, pid, tl.load(meta + SEG_COLS), tl.load(meta + SEG_WORDS_PER_ROW),
                                        num_words, TILE_WORDS, FLAT)
    P = tensor_pointers(tl.load(meta + SEG_PARAM), offsets, VALUE_TYPE, FLAT)
    G = tensor_pointers(tl.load(meta + SEG_GRAD), offsets, VALUE_TYPE, FLAT)
    M = tensor_pointers(tl.load(meta + SEG_EXP_AVG), offsets, VALUE_TYPE, FLAT)
    V = tensor_pointers(tl.load(meta + SEG_EXP_AVG_SQ), offsets, VALUE_TYPE, FLAT)
    VMAX = tensor_pointers(tl.load(meta + SEG_MAX_EXP_AVG_SQ), offsets, VALUE_TYPE, FLAT)
    keep = tile_keep(W, word, mask_words)
    g = tl.load(G, mask=valid, other=0).to(COMPUTE_TYPE)
    if MAXIMIZE:
        g = -g
    x = tl.load(P, mask=valid, other=0).to(COMPUTE_TYPE)
    if WEIGHT_DECAY:
        x = x * decay
    m = tl.load(M, mask=valid, other=0).to(COMPUTE_TYPE)
    diff = g - m
    if SMALL_WEIGHT:
        m = tl.fma(avg_weight, diff, m)
    else:
        m = tl.fma(-diff, avg_keep, g)
    v = tl.load(V, mask=valid, other=0).to(COMPUTE_TYPE)
    if CUDA_FOREACH:  # torch's CUDA _foreach_addcmul_: v + value * (g * g), contracted
        v = tl.fma(sq_weight, g * g, v * beta2)
    else:  # its CPU addcmul: v + (value * g) * g, vectorised as one fma
        v = tl.fma(sq_weight * g, g, v * beta2)
    second = v
    if AMSGRAD:
        old = tl.load(VMAX, mask=valid, other=0).to(COMPUTE_TYPE)
        second = tl.where((old > v) | (old != old), old, v)  # torch.maximum: NaN wins
        tl.store(VMAX, tl.where(keep, second, 0.0).to(VALUE_TYPE), mask=valid)
    # addcdiv: CUDA's _foreach_addcdiv_ computes x + value * (m / denom), contracted; CPU's
    # addcdiv x + (value * m) / denom
    if FP64:  # fp64 sqrt and division are IEEE-rounded already (tl.*_rn take fp32 only)
        denom = tl.sqrt(second) / bc2_sqrt + eps
        if CUDA_FOREACH:
            p = tl.fma(neg_step, m / denom, x)
        else:
            p = x + (neg_step * m) / denom
    else:  # fp32 `/` and tl.sqrt would be the fast approximations on a GPU
        denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
        if CUDA_FOREACH:
            p = tl.fma(neg_step, tl.div_rn(m, denom), x)
        else:
            p = x + tl.div_rn(neg_step * m, denom)
    tl.store(P, tl.where(keep, p, 0.0).to(VALUE_TYPE), mask=valid)
    tl.store(M, tl.where(keep, m, 0.0).to(VALUE_TYPE), mask=valid)
    tl.store(V, tl.where(keep, v, 0.0).to(VALUE_TYPE), mask=valid)


@triton.jit
def _masked_adamw_kernel(SEG_META, TILES, HYPER, STEPS, VALUE_TYPE: tl.constexpr, COMPUTE_TYPE: tl.constexpr,
                         AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                         SMALL_WEIGHT: tl.constexpr, FP64: tl.constexpr, CUDA_FOREACH: tl.constexpr,
                         TILE_WORDS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tile_segment(TILES, pid)
    meta = SEG_META + seg * SEG_COLUMNS
    W = tl.load(meta + SEG_MASK).to(tl.pointer_type(tl.int32))
    num_words = tl.load(meta + SEG_WORDS)
    decay = tl.load(HYPER + 0).to(COMPUTE_TYPE)
    avg_weight = tl.load(HYPER + 1).to(COMPUTE_TYPE)
    avg_keep = tl.load(HYPER + 2).to(COMPUTE_TYPE)
    beta2 = tl.load(HYPER + 3).to(COMPUTE_TYPE)
    sq_weight = tl.load(HYPER + 4).to(COMPUTE_TYPE)
    eps = tl.load(HYPER + 5).to(COMPUTE_TYPE)
    neg_step = tl.load(STEPS + seg * STEP_COLUMNS + STEP_NEG_SIZE).to(COMPUTE_TYPE)
    bc2_sqrt = tl.load(STEPS + seg * STEP_COLUMNS + STEP_BC2_SQRT).to(COMPUTE_TYPE)
    flags = tl.load(meta + SEG_FLAGS)
    # a dense tensor (no mask) reads no mask words: all bits set
    mask_words = tl.where((flags & HAS_MASK) != 0, num_words, 0)

    # consecutive elements, 16-byte aligned tensors: whole vectors per load and store
    if flat_tile(TILES, pid, (flags & FLAT) != 0, tl.load(meta + SEG_NUMEL), TILE_WORDS):
        _adamw_tile(meta, TILES, pid, W, num_words, mask_words, decay, avg_weight, avg_keep, beta2, sq_weight, eps,
                    neg_step, bc2_sqrt, VALUE_TYPE, COMPUTE_TYPE, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, SMALL_WEIGHT,
                    FP64, CUDA_FOREACH, TILE_WORDS, True)
    else:
        _adamw_tile(meta, TILES, pid, W, num_words, mask_words, decay, avg_weight, avg_keep, beta2, sq_weight, eps,
                    neg_step, bc2_sqrt, VALUE_TYPE, COMPUTE_TYPE, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, SMALL_WEIGHT,
                    FP64, CUDA_FOREACH, TILE_WORDS, False)


# no contraction of a multiply and a later add into one fma where torch rounds between them
# (p * (1 - lr*wd), then + the update); the explicit tl.fma calls stay fused
LAUNCH_OPTIONS = dict(num_warps=TABLE_NUM_WARPS, enable_fp_fusion=False)



def torch_cuda_rounding(device: torch.device) -> bool:
    """Whether the step rounds as torch's CUDA foreach kernels (else as its CPU kernels)."""
    return device.type == "cuda"


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, torch_fused=False,
                  tile_words: int | None = None, cuda_foreach: bool | None = None, static_key=None) -> None:
    """Same contract as backends/torch/masked_adamw.masked_adamw_: contiguous fp32/fp64 tensors on one device;
    mask_words[i] int32 (rows, ceil(cols/32)) or None; state_steps incremented here. One
    arithmetic for both of AdamW's (torch_fused is accepted and changes nothing).

    The rounding follows torch's foreach AdamW on the tensors' device: its CUDA kernels and its
    CPU kernels order addcmul and addcdiv differently (cuda_foreach: None = by the device; the
    tests set it to check both orders under the interpreter). static_key: see
    _tiles.planned_tables (the gradients may change)."""
    if not params:
        return
    device = params[0].device
    if cuda_foreach is None:
        cuda_foreach = torch_cuda_rounding(device)
    tile_words = tile_words_for(device, tile_words, gpu_default=GPU_TILE_WORDS)
    step_sizes, bias_correction2_sqrts = advance_steps(state_steps, lr, beta1, beta2)

    def tables():
        return segment_tables(params, mask_words, lambda i: [
            params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
            max_exp_avg_sqs[i].data_ptr() if amsgrad else params[i].data_ptr()], tile_words, device)

    varying = (tuple(g.data_ptr() for g in grads), bool(amsgrad), tile_words) if static_key is not None else ()
    for dtype, index, tiles, meta in planned_tables(static_key, varying, tables):
        # lerp's weight as the kernel rounds it, and its other branch's 1 - weight from it
        # (1 - w in fp64 is exact: rounded to fp32 by the kernel, it is fp32's 1.0f - w)
        weight = float(torch.tensor(1 - beta1, dtype=torch.float64 if dtype == torch.float64 else torch.float32))
        hyper = cached_table([1 - lr * weight_decay, 1 - beta1, 1 - weight, beta2, 1 - beta2, eps],
                             torch.float64, device)
        step_table = host_table([[-step_sizes[i], bias_correction2_sqrts[i]] for i in index],
                                torch.float64, device)
        launch(_masked_adamw_kernel, (tiles.shape[0],), **LAUNCH_OPTIONS)(
            meta, tiles, hyper, step_table, VALUE_TYPE=TL_FLOAT[dtype],
            COMPUTE_TYPE=tl.float64 if dtype == torch.float64 else tl.float32, AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, SMALL_WEIGHT=abs(weight) < 0.5,
            FP64=dtype == torch.float64, CUDA_FOREACH=bool(cuda_foreach), TILE_WORDS=tile_words)
