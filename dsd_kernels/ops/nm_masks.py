"""Exact N:M masks: in every M consecutive weights of a row keep the N largest |w|
(custom op `dsd_kernels::nm_masks`); the public spelling is `magnitude_masks(tensors, "2:4")`."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from typing import List

import torch
from torch import Tensor

from .. import _backend
from .._floatbits import KEY_SPECS
from ..masks import mask_rows_cols, packed_shape
from ._common import MAX_NM_GROUP, dtypes_of

__all__ = ["check_nm_rows"]


def check_nm_rows(tensors, n: int, m: int, names=None) -> None:
    """Every row (shape[0], -1) a whole number of groups of M: else a ValueError naming the tensor."""
    for i, t in enumerate(tensors):
        rows, cols = mask_rows_cols(t.shape)
        if cols % m:
            name = names[i] if names is not None else f"tensors[{i}]"
            raise ValueError(f"{name} of shape {tuple(t.shape)} has rows of {cols} weights (viewed as "
                             f"({rows}, {cols})), not a multiple of M={m}: it cannot take {n}:{m} sparsity")


def _check_nm_args(tensors: list[Tensor], n: int, m: int) -> None:
    torch._check_value(1 <= n < m <= MAX_NM_GROUP,
                       lambda: f"nm_masks: n={n}, m={m} is not an N:M pattern (1 <= N < M <= {MAX_NM_GROUP})")
    for i, t in enumerate(tensors):
        torch._check_type(t.dtype in KEY_SPECS, lambda: f"tensors[{i}] has dtype {t.dtype}; N:M masks need a "
                                                        f"floating tensor (float16, bfloat16, float32 or float64)")
        torch._check_value(t.device == tensors[0].device,
                           lambda: f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}")
    check_nm_rows(tensors, n, m)


@torch.library.custom_op("dsd_kernels::nm_masks", mutates_args=())
def _nm_masks_op(tensors: List[Tensor], n: int, m: int) -> List[Tensor]:
    """The packed int32 keep-words of every tensor (see masks.py for the layout)."""
    _check_nm_args(tensors, n, m)
    if not tensors:
        return []
    impl = _backend.implementation("nm_masks", tensors[0].device, dtypes_of(tensors))
    return impl.nm_masks([t.detach() for t in tensors], n, m)


@_nm_masks_op.register_fake
def _(tensors, n, m):
    _check_nm_args(tensors, n, m)
    return [t.new_empty(packed_shape(t.shape), dtype=torch.int32) for t in tensors]
