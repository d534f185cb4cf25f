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
tile sizes (64 x 64 x 64, fixed: no autotuning until a GPU can be measured).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tile_structure import TILE, tile_structure
from ._tiles import launch

BLOCK_M, BLOCK_N, BLOCK_K = 64, TILE, TILE  # BLOCK_K is a multiple of 32 (mask words)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full fp32 products, like F.linear (torch does not use TF32 by default)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _masked_weight_tile(W, WORDS, n, k, N, K, words_per_row, UPCAST: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile of W*M for row offsets n (BN, 1) and column offsets k (1, BK)."""
    inside = (n < N) & (k < K)
    w = tl.load(W + n * K + k, mask=inside, other=0.0)
    words = tl.load(WORDS + n * words_per_row + k // 32, mask=inside, other=0)
    kept = ((words >> (k % 32)) & 1) != 0
    w = tl.where(kept, w, 0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _forward_kernel(X, W, WORDS, BIAS, Y, ROW_PTR, COL_IDX, M, N, K, words_per_row,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[:, None]
    kk = tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.load(ROW_PTR + pid_n)
    end = tl.load(ROW_PTR + pid_n + 1)
    for i in range(start, end):  # only the k-tiles of this n-tile that keep something
        k = tl.load(COL_IDX + i) * BLOCK_K + kk
        x = tl.load(X + m * K + k, mask=(m < M) & (k < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        w = _masked_weight_tile(W, WORDS, n, k, N, K, words_per_row, UPCAST)
        acc += _dot(x, tl.trans(w), IEEE)
    n_row = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + n_row, mask=n_row < N, other=0.0).to(tl.float32)
    tl.store(Y + m * N + n_row, acc.to(Y.dtype.element_ty), mask=(m < M) & (n_row < N))


@triton.jit
def _grad_input_kernel(DY, W, WORDS, DX, COL_PTR, ROW_IDX, M, N, K, words_per_row,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    nn = tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    start = tl.load(COL_PTR + pid_k)
    end = tl.load(COL_PTR + pid_k + 1)
    for j in range(start, end):  # only the n-tiles of this k-tile that keep something
        n0 = tl.load(ROW_IDX + j) * BLOCK_N
        n_col = n0 + nn[None, :]
        dy = tl.load(DY + m * N + n_col, mask=(m < M) & (n_col < N), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
        w = _masked_weight_tile(W, WORDS, n0 + nn[:, None], k, N, K, words_per_row, UPCAST)
        acc += _dot(dy, w, IEEE)
    tl.store(DX + m * K + k, acc.to(DX.dtype.element_ty), mask=(m < M) & (k < K))


@triton.jit
def _grad_weight_kernel(DY, X, WORDS, DW, TILE_KEPT, M, N, K, words_per_row, tiles_k,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)[:, None]
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if tl.load(TILE_KEPT + pid_n * tiles_k + pid_k) != 0:  # an empty tile's gradient is 0
        mm = tl.arange(0, BLOCK_M).to(tl.int64)
        for m0 in range(0, M, BLOCK_M):
            m_col = m0 + mm[None, :]
            m_row = m0 + mm[:, None]
            dy_t = tl.load(DY + m_col * N + n, mask=(m_col < M) & (n < N), other=0.0)  # (BN, BM)
            x = tl.load(X + m_row * K + k, mask=(m_row < M) & (k < K), other=0.0)  # (BM, BK)
            if UPCAST:
                dy_t = dy_t.to(tl.float32)
                x = x.to(tl.float32)
            acc += _dot(dy_t, x, IEEE)
        inside = (n < N) & (k < K)
        words = tl.load(WORDS + n * words_per_row + k // 32, mask=inside, other=0)
        acc = tl.where(((words >> (k % 32)) & 1) != 0, acc, 0.0)
    tl.store(DW + n * K + k, acc.to(DW.dtype.element_ty), mask=(n < N) & (k < K))


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter multiplies raw bf16 bits in tl.dot (TRITON-ON-CPU.md): compute in fp32 there
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forward(x2d: torch.Tensor, weight: torch.Tensor, words: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """x2d (M, K), weight (N, K), words int32 (N, ceil(K/32)), bias (N,) or None -> (M, N)."""
    M, K = x2d.shape
    N = weight.shape[0]
    s = tile_structure(words, N, K)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    launch(_forward_kernel, (triton.cdiv(M, BLOCK_M), s.tiles_n))(
        x2d, weight, words, bias if bias is not None else weight, y, s.row_ptr, s.col_idx,
        M, N, K, words.shape[1], HAS_BIAS=bias is not None, UPCAST=_upcast(x2d.dtype),
        IEEE=x2d.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    """(dX (M, K) or None, dW (N, K) or None)."""
    M, K = x2d.shape
    N = weight.shape[0]
    s = tile_structure(words, N, K)
    upcast = _upcast(x2d.dtype)
    ieee = x2d.dtype == torch.float32
    dx = dw = None
    if needs_input:
        dx = torch.empty((M, K), dtype=x2d.dtype, device=x2d.device)
        launch(_grad_input_kernel, (triton.cdiv(M, BLOCK_M), s.tiles_k))(
            grad2d, weight, words, dx, s.col_ptr, s.row_idx, M, N, K, words.shape[1],
            UPCAST=upcast, IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if needs_weight:
        dw = torch.empty((N, K), dtype=weight.dtype, device=weight.device)
        launch(_grad_weight_kernel, (s.tiles_n, s.tiles_k))(
            grad2d, x2d, words, dw, s.kept, M, N, K, words.shape[1], s.tiles_k,
            UPCAST=upcast, IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dx, dw
