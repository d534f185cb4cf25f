"""masked_linear on the C++ CPU kernels (csrc/cpu/masked_linear.cpp), tile skipping included (kept
tiles of fp32 multiplied by tile_gemm where the CPU has AVX2 or AVX-512; with unstructured masks,
batches of at most FEW_ROWS rows by its few-rows kernels on AVX-512, larger ones by oneDNN on W*M
where ATen runs AVX-512, else by ATen's matmul on W*M); there is no CUDA kernel (the registry gives
CUDA tensors to Triton)."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from ..dense_matmul import linear, prefer_onednn_linear
from ..tile_structure import blocked_tiles
from ..torch._mask_cache import masked_copy


# dW = dY^T x reduces over the batch rows: with few of them (decoding) MKL's outer products
# measured faster than oneDNN's transposed-operand path
ONEDNN_MIN_ROWS_FOR_DW = 64


# batches of at most this many rows with unstructured masks: the C++ few-rows kernels (fp32 on
# AVX-512: kFewRows in csrc/cpu/masked_linear.cpp), which read W once and write no W*M
FEW_ROWS = 4


def _few_rows(x2d, weight) -> bool:
    return (1 <= x2d.shape[0] <= FEW_ROWS and x2d.dtype == weight.dtype == torch.float32
            and torch.ops.dsd_kernels_cpp.masked_linear_tile_kernel() == "avx512")


def _tile_kept(words, weight):
    """The kept-tile flags when tile skipping pays (cached per mask version), else None."""
    s = blocked_tiles(words, weight.shape[0], weight.shape[1])
    return s.kept if s is not None else None


def forward(x2d, weight, words, bias):
    kept = _tile_kept(words, weight)
    if kept is None and prefer_onednn_linear(x2d) and not _few_rows(x2d, weight):
        return linear(x2d, masked_copy(weight, words), bias)  # W*M whole: oneDNN's matmul (dense_matmul)
    return torch.ops.dsd_kernels_cpp.masked_linear_forward(x2d, weight, words, bias, kept)


def backward(grad2d, x2d, weight, words, needs_input: bool, needs_weight: bool):
    kept = _tile_kept(words, weight)
    if kept is None and prefer_onednn_linear(x2d):
        if needs_input and _few_rows(grad2d, weight):
            dx = torch.ops.dsd_kernels_cpp.masked_linear_backward(grad2d, x2d, weight, words, True, False, None)[0]
        else:
            dx = linear(grad2d, masked_copy(weight, words).t()) if needs_input else None
        dw = None
        if needs_weight and x2d.shape[0] >= ONEDNN_MIN_ROWS_FOR_DW:
            dw = linear(grad2d.t(), x2d.t())
            torch.ops.dsd_kernels_cpp.apply_masks_([dw], [words])  # exactly +0 where pruned
        elif needs_weight:
            dw = torch.ops.dsd_kernels_cpp.masked_linear_backward(grad2d, x2d, weight, words, False, True, None)[1]
        return dx, dw
    dx, dw = torch.ops.dsd_kernels_cpp.masked_linear_backward(grad2d, x2d, weight, words,
                                                              needs_input, needs_weight, kept)
    return (dx if needs_input else None), (dw if needs_weight else None)

