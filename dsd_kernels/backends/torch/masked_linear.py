"""Masked linear from torch ops (CPU path, and fp64 anywhere).

W*M costs one bitwise-AND pass over W with the cached 0/-1 words of the mask (see
_mask_cache). When enough (TILE x TILE) tiles of the mask are empty (block pruning), the CPU
matmuls cover the kept tiles only, one addmm_ per run of adjacent kept tiles (views, no
copies), so block sparsity turns into speed; otherwise one dense matmul on W*M is faster
(dense_matmul.linear: oneDNN's for fp32 on CPU where torch has it).
"""
from __future__ import annotations

from ..dense_matmul import linear
from ..tile_structure import TILE, blocked_tiles
from ._mask_cache import apply_and_, masked_copy


def _tiles(words, weight):
    return blocked_tiles(words, weight.shape[0], weight.shape[1])


def forward(x2d, weight, words, bias):
    wm = masked_copy(weight, words)
    s = _tiles(words, weight)
    if s is None:
        return linear(x2d, wm, bias)
    M, N = x2d.shape[0], weight.shape[0]
    y = bias.expand(M, N).clone() if bias is not None else x2d.new_zeros(M, N)
    for n, runs in enumerate(s.host_runs()[0]):
        y_n, w_n = y[:, n * TILE:(n + 1) * TILE], wm[n * TILE:(n + 1) * TILE]
        for a, b in runs:
            y_n.addmm_(x2d[:, a * TILE:b * TILE], w_n[:, a * TILE:b * TILE].t())
    return y


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    s = _tiles(words, weight)
    dx = dw = None
    if needs_input:
        wm = masked_copy(weight, words)
        if s is None:
            dx = linear(grad2d, wm.t())
        else:
            dx = x2d.new_zeros(x2d.shape)
            for k, runs in enumerate(s.host_runs()[1]):
                dx_k = dx[:, k * TILE:(k + 1) * TILE]
                for a, b in runs:
                    dx_k.addmm_(grad2d[:, a * TILE:b * TILE], wm[a * TILE:b * TILE, k * TILE:(k + 1) * TILE])
    if needs_weight:
        if s is None:
            dw = linear(grad2d.t(), x2d.t())
        else:
            dw = weight.new_zeros(weight.shape)
            for n, runs in enumerate(s.host_runs()[0]):
                g_n = grad2d[:, n * TILE:(n + 1) * TILE].t()
                for a, b in runs:
                    dw[n * TILE:(n + 1) * TILE, a * TILE:b * TILE].addmm_(g_n, x2d[:, a * TILE:b * TILE])
        apply_and_(dw, words)
    return dx, dw
