"""Masked matmul for MaskedLinear: y = x @ (W*M)^T + b, dX = dY @ (W*M), dW = (dY^T @ X) * M.

W*M is never materialised: every W tile is loaded with its packed mask words and zeroed
where pruned before tl.dot (fp32 accumulation). Tile skipping: a (BLOCK_N x BLOCK_K)
tile of M with no kept bit is recorded once per mask version (tile_structure.py), and
  forward  iterates, per n-tile, only over its non-empty k-tiles (CSR lists),
  dX       iterates, per k-tile, only over its non-empty n-tiles (CSC lists),
  dW       writes zeros for an empty tile without reading dY or X.
So block sparsity (e.g. magnitude_masks(..., block=(64, 64))) turns into fewer FLOPs and
bytes; unstructured 50% sparsity leaves almost every tile non-empty (dense speed).

Launches: 1 per forward, 2 per backward (dX, dW) + torch's bias reduction.
Bytes each pass must move at least (e = element size, kept = fraction of non-empty tiles):
forward  x M*K*e + W N*K*e*kept + mask N*K/8 + y M*N*e;  dX  dY M*N*e + W*kept + mask + dX M*K*e;
dW  dY M*N*e + X M*K*e (each read once per tile column/row that keeps something) + dW N*K*e.
The grid re-reads x once per n-tile and W once per m-tile; L2 absorbs most of that at these
tile sizes. Launch configs: the static choice (block_m_for, launch_options) runs decode-like
batches of at most 16 rows as 16 x 64 programs on 4 warps, larger ones 64 x 64 on 8 warps. On a
GPU, triton.autotune times a small set of candidates per batch-size class instead (ROW_CONFIGS,
GRAD_WEIGHT_WARPS; row_configs_for) once per layer shape, dtype and precision, and keeps the
fastest; DSD_KERNELS_AUTOTUNE=0 keeps the static choice (autotune_enabled). Every candidate
compiles for sm_80 and sm_90 without spills (tests/test_aot.py).

Registers: each tl.dot reduces over a slice of the tile that lies within one mask word per
weight row (32 elements; 16 for exact fp32, whose FMA dot holds whole operand rows), so the mask
costs one word load per row and a shift, and dX programs write half a k-tile (32 columns). With
8 warps (and no software pipelining before sm_90: launch_options) every kernel compiles for
sm_80 and sm_90 without spills (tests/test_aot.py, triton 3.6
and the installed one). fp32 follows torch's TF32 setting for matmuls, as F.linear does: exact
fp32 products by default, tensor-core tf32 when allowed.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..tile_structure import TILE, tile_structure
from ._tiles import launch

BLOCK_N = BLOCK_K = TILE  # the mask's tile: the unit of tile skipping (tile_structure.py)
BLOCK_M = 64  # rows of x / dY per program
SMALL_M = 16  # decode-like batches, at most this many rows: 16-row programs (block_m_for)
HALF_K = TILE // 2  # grad_input: a program writes half a k-tile (32 columns: one mask word a row)
NUM_WARPS = 8  # with 4, every dtype spilled registers on sm_80 or sm_90 (tests/test_aot.py)


def block_m_for(M: int) -> int:
    """Rows of x per program for a batch of M rows: decode-like batches (M <= SMALL_M) take
    16-row programs, where a 64-row one would leave three quarters of its tile idle."""
    return SMALL_M if M <= SMALL_M else BLOCK_M


def launch_options(capability: tuple[int, int], block_m: int = BLOCK_M) -> dict:
    """num_warps and num_stages for a GPU of this compute capability and programs of block_m
    rows (16-row programs on 4 warps). Before Hopper, software pipelining (triton's default 3
    stages) made the forward kernels spill (fp16/bf16, and fp32 tf32 with triton 3.6), so
    sm_80-class GPUs run unpipelined; the short kept-tile loops lose little."""
    return {"num_warps": 4 if block_m == SMALL_M else NUM_WARPS,
            "num_stages": 3 if capability >= (9, 0) else 1}


@lru_cache(maxsize=None)
def _device_launch_options(device: torch.device, block_m: int = BLOCK_M) -> dict:
    if device.type != "cuda":  # the interpreter: options do not matter
        return {"num_warps": 4 if block_m == SMALL_M else NUM_WARPS}
    return launch_options(torch.cuda.get_device_capability(device), block_m)


# Autotuning candidates, each compiled without spills for sm_80 and sm_90 (tests/test_aot.py):
# forward and dX (rows per program, warps), smallest first; dW warps (its programs are one
# 64 x 64 tile of dW, reducing over all rows). Pipeline stages stay launch_options'.
ROW_CONFIGS = ((SMALL_M, 4), (32, NUM_WARPS), (BLOCK_M, NUM_WARPS), (128, NUM_WARPS))
GRAD_WEIGHT_WARPS = (NUM_WARPS, 4)
EXACT_FP32_MAX_ROWS = 64  # exact fp32 (FMA) dots hold whole operand rows: 128-row forwards spill


def row_candidates(ieee: bool) -> tuple[tuple[int, int], ...]:
    """ROW_CONFIGS that compile without spills for this precision."""
    return tuple(c for c in ROW_CONFIGS if not (ieee and c[0] > EXACT_FP32_MAX_ROWS))


def rows_class(M: int) -> int:
    """The batch-size class of M rows that autotuning keys on: M rounded up to a power of two,
    clamped to [SMALL_M, 256] (beyond 256 rows the same candidates compete)."""
    return max(SMALL_M, min(triton.next_power_of_2(max(M, 1)), 256))


def row_configs_for(M: int, ieee: bool) -> tuple[tuple[int, int], ...]:
    """The (BLOCK_M, num_warps) candidates autotuning weighs for the forward and dX of a batch of
    M rows: the two largest programs of at most rows_class(M) rows (one for decode-like batches:
    nothing to tune)."""
    return tuple(c for c in row_candidates(ieee) if c[0] <= rows_class(M))[-2:]


def autotune_enabled(device: torch.device) -> bool:
    """DSD_KERNELS_AUTOTUNE: unset, on for CUDA tensors; "0" never (the static choice); "1" also
    under the Triton interpreter, where the candidates are timed by wall clock: that checks the
    tuning's plumbing on a CPU machine, and nothing about speed."""
    flag = os.environ.get("DSD_KERNELS_AUTOTUNE", "")
    if flag == "0":
        return False
    return flag == "1" or device.type == "cuda"


def _wall_clock_bench(kernel_call, quantiles=None):
    # the interpreter has no GPU benchmarker: median of three wall-clock runs, in ms
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [times[1]] * (len(quantiles) if quantiles else 1)


@lru_cache(maxsize=None)
def _tuned_kernel(name: str, rows: int, ieee: bool, capability: tuple[int, int] | None):
    """triton.autotune of kernel `name` over its candidates for batches of class `rows` in this
    precision, with the stages of a GPU of this capability (None: the interpreter), or None where
    one candidate is left. Its cache keys on the layer shape (N, K) and the dtypes."""
    kernel = _KERNELS[name]
    stages = launch_options(capability)["num_stages"] if capability else 1
    if name == "grad_weight":
        configs = [triton.Config({}, num_warps=w, num_stages=stages) for w in GRAD_WEIGHT_WARPS]
    else:
        configs = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=stages) for m, w in row_configs_for(rows, ieee)]
    if len(configs) == 1:
        return None
    return triton.autotune(configs, key=["N", "K"], do_bench=None if capability else _wall_clock_bench)(kernel)


def tuned_kernel(name: str, device: torch.device, M: int, ieee: bool):
    """The autotuned kernel for a batch of M rows on `device` in this precision (use_ieee), or
    None: the static choice."""
    if not autotune_enabled(device):
        return None
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return _tuned_kernel(name, rows_class(M), ieee, capability)


def reduction_step(ieee: bool) -> int:
    """Elements of the reduced dimension per tl.dot: exact fp32 products (FMA, not tensor cores)
    hold whole operand rows in registers, so they take 16 at a time (32 spilled); tensor-core
    dots (fp16, bf16, tf32) take 32, one mask word per weight row."""
    return 16 if ieee else 32


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full fp32 products unless torch allows TF32 for matmuls (as F.linear)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _row_word_keep(WORDS, n, k0, bits, N, words_per_row):
    """Mask bits of W rows n (R, 1) at columns k0 + bits (1, S), S <= 32 within one mask word:
    one word per row, shifted per column (no per-element gather of words)."""
    rows = tl.where(k0 < words_per_row * 32, N, 0)  # no row's word past the last one
    word = tl.load(WORDS + n * words_per_row + k0 // 32, mask=n < rows, other=0)
    return ((word >> ((k0 % 32) + bits)) & 1) != 0


@triton.jit
def _forward_kernel(X, W, WORDS, BIAS, Y, ROW_PTR, COL_IDX, M, N, K, words_per_row,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    STEP: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[:, None]
    bits = tl.arange(0, STEP).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.load(ROW_PTR + pid_n)
    end = tl.load(ROW_PTR + pid_n + 1)
    for i in range(start, end):  # only the k-tiles of this n-tile that keep something
        tile_k0 = tl.load(COL_IDX + i) * BLOCK_K
        for s in tl.static_range(BLOCK_K // STEP):
            k0 = tile_k0 + s * STEP
            k = k0 + bits
            x = tl.load(X + m * K + k, mask=(m < M) & (k < K), other=0.0)
            w = tl.load(W + n * K + k, mask=(n < N) & (k < K), other=0.0)
            w = tl.where(_row_word_keep(WORDS, n, k0, bits, N, words_per_row), w, 0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc += _dot(x, tl.trans(w), IEEE)
    n_row = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + n_row, mask=n_row < N, other=0.0).to(tl.float32)
    tl.store(Y + m * N + n_row, acc.to(Y.dtype.element_ty), mask=(m < M) & (n_row < N))


@triton.jit
def _grad_input_kernel(DY, W, WORDS, DX, COL_PTR, ROW_IDX, M, N, K, words_per_row,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, HALF_K: tl.constexpr, STEP: tl.constexpr):
    # program (pid_m, pid_h): dX rows of pid_m, columns of half h = pid_h % 2 of k-tile pid_h // 2
    pid_m = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    tile = pid_h // 2
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    k0 = pid_h * HALF_K  # one mask word per weight row
    k = k0 + tl.arange(0, HALF_K).to(tl.int64)[None, :]
    rows = tl.arange(0, STEP).to(tl.int64)
    acc = tl.zeros((BLOCK_M, HALF_K), dtype=tl.float32)
    start = tl.load(COL_PTR + tile)
    end = tl.load(COL_PTR + tile + 1)
    for j in range(start, end):  # only the n-tiles of this k-tile that keep something
        tile_n0 = tl.load(ROW_IDX + j) * BLOCK_N
        for s in tl.static_range(BLOCK_N // STEP):
            n_col = tile_n0 + s * STEP + rows[None, :]
            n_row = tile_n0 + s * STEP + rows[:, None]
            dy = tl.load(DY + m * N + n_col, mask=(m < M) & (n_col < N), other=0.0)
            w = tl.load(W + n_row * K + k, mask=(n_row < N) & (k < K), other=0.0)
            keep = _row_word_keep(WORDS, n_row, k0, tl.arange(0, HALF_K).to(tl.int64)[None, :], N, words_per_row)
            w = tl.where(keep, w, 0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc += _dot(dy, w, IEEE)
    tl.store(DX + m * K + k, acc.to(DX.dtype.element_ty), mask=(m < M) & (k < K))


@triton.jit
def _grad_weight_kernel(DY, X, WORDS, DW, TILE_KEPT, M, N, K, words_per_row, tiles_k,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, STEP: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[:, None]
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if tl.load(TILE_KEPT + pid_n * tiles_k + pid_k) != 0:  # an empty tile's gradient is 0
        mm = tl.arange(0, STEP).to(tl.int64)
        for m0 in range(0, M, STEP):  # the reduction over rows, STEP at a time
            m_col = m0 + mm[None, :]
            m_row = m0 + mm[:, None]
            dy_t = tl.load(DY + m_col * N + n, mask=(m_col < M) & (n < N), other=0.0)  # (BN, STEP)
            x = tl.load(X + m_row * K + k, mask=(m_row < M) & (k < K), other=0.0)  # (STEP, BK)
            if UPCAST:
                dy_t = dy_t.to(tl.float32)
                x = x.to(tl.float32)
            acc += _dot(dy_t, x, IEEE)
        inside = (n < N) & (k < K)
        words = tl.load(WORDS + n * words_per_row + k // 32, mask=inside, other=0)
        acc = tl.where(((words >> (k % 32)) & 1) != 0, acc, 0.0)
    tl.store(DW + n * K + k, acc.to(DW.dtype.element_ty), mask=(n < N) & (k < K))


_KERNELS = {"forward": _forward_kernel, "grad_input": _grad_input_kernel, "grad_weight": _grad_weight_kernel}


def use_ieee(dtype: torch.dtype) -> bool:
    """Exact fp32 products for fp32 inputs unless torch allows TF32 in matmuls, as F.linear does
    (torch.backends.cuda.matmul.allow_tf32, set by torch.set_float32_matmul_precision)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter multiplies raw bf16 bits in tl.dot (TRITON-ON-CPU.md): compute in fp32 there
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_over_rows(name: str, device: torch.device, M: int, ieee: bool, columns: int, args: tuple,
                      consts: dict) -> None:
    """Kernel `name` (forward or grad_input) on a (row blocks of M, columns) grid: autotuned where
    tuned_kernel gives a tuner (the row block is the tuner's pick), else the static choice."""
    tuned = tuned_kernel(name, device, M, ieee)
    if tuned is not None:
        launch(tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), columns))(*args, **consts)
        return
    block_m = block_m_for(M)
    kernel = _KERNELS[name]
    launch(kernel, (triton.cdiv(M, block_m), columns), **_device_launch_options(device, block_m))(
        *args, **consts, BLOCK_M=block_m)


def forward(x2d: torch.Tensor, weight: torch.Tensor, words: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """x2d (M, K), weight (N, K), words int32 (N, ceil(K/32)), bias (N,) or None -> (M, N)."""
    M, K = x2d.shape
    N = weight.shape[0]
    s = tile_structure(words, N, K)
    ieee = use_ieee(x2d.dtype)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    args = (x2d, weight, words, bias if bias is not None else weight, y, s.row_ptr, s.col_idx,
            M, N, K, words.shape[1])
    consts = dict(HAS_BIAS=bias is not None, UPCAST=_upcast(x2d.dtype), IEEE=ieee, BLOCK_N=BLOCK_N,
                  BLOCK_K=BLOCK_K, STEP=reduction_step(ieee))
    _launch_over_rows("forward", x2d.device, M, ieee, s.tiles_n, args, consts)
    return y


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    """(dX (M, K) or None, dW (N, K) or None)."""
    M, K = x2d.shape
    N = weight.shape[0]
    s = tile_structure(words, N, K)
    upcast = _upcast(x2d.dtype)
    ieee = use_ieee(x2d.dtype)
    step = reduction_step(ieee)
    dx = dw = None
    if needs_input:
        dx = torch.empty((M, K), dtype=x2d.dtype, device=x2d.device)
        args = (grad2d, weight, words, dx, s.col_ptr, s.row_idx, M, N, K, words.shape[1])
        consts = dict(UPCAST=upcast, IEEE=ieee, BLOCK_N=BLOCK_N, HALF_K=HALF_K, STEP=step)
        _launch_over_rows("grad_input", x2d.device, M, ieee, 2 * s.tiles_k, args, consts)
    if needs_weight:
        dw = torch.empty((N, K), dtype=weight.dtype, device=weight.device)
        args = (grad2d, x2d, words, dw, s.kept, M, N, K, words.shape[1], s.tiles_k)
        consts = dict(UPCAST=upcast, IEEE=ieee, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, STEP=step)
        tuned = tuned_kernel("grad_weight", x2d.device, M, ieee)
        if tuned is not None:
            launch(tuned, (s.tiles_n, s.tiles_k))(*args, **consts)
        else:
            launch(_grad_weight_kernel, (s.tiles_n, s.tiles_k), **_device_launch_options(x2d.device))(*args, **consts)
    return dx, dw
