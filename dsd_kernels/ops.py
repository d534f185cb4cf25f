"""The public fused ops, registered as torch.library custom ops `dsd_kernels::*`.

This is the one place that chooses a backend (see _backend.py); everything above it
(optim/, nn/, dsd/) calls these functions, never a kernel. Each op validates its
arguments here, so every backend sees well-formed input.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import reduce

import torch
from torch import Tensor

from . import _backend
from ._floatbits import KEY_SPECS
from .masks import Mask, mask_rows_cols

__all__ = ["magnitude_thresholds", "magnitude_masks"]


# ---------------------------------------------------------------- argument checks
def _as_tensor_list(tensors, name: str = "tensors") -> list[Tensor]:
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Sequence) or isinstance(tensors, (str, bytes)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_float_same_device(tensors: list[Tensor], name: str = "tensors") -> None:
    for i, t in enumerate(tensors):
        if t.dtype not in KEY_SPECS:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; magnitude selection needs a "
                            f"floating tensor (float16, bfloat16, float32 or float64)")
        if t.device != tensors[0].device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on "
                             f"{tensors[0].device}; all tensors must share one device")


def _sparsity_list(sparsity, count: int) -> list[float]:
    if isinstance(sparsity, Tensor):
        sparsity = sparsity.tolist()
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
        values, names = [float(sparsity)] * count, ["sparsity"] * count
    elif isinstance(sparsity, Sequence) and not isinstance(sparsity, (str, bytes)):
        if len(sparsity) != count:
            raise ValueError(f"sparsity has {len(sparsity)} values but there are {count} tensors; "
                             f"give one float or one per tensor")
        values, names = [], []
        for i, s in enumerate(sparsity):
            if not isinstance(s, numbers.Real) or isinstance(s, bool):
                raise TypeError(f"sparsity[{i}] must be a float, got {type(s).__name__}")
            values.append(float(s))
            names.append(f"sparsity[{i}]")
    else:
        raise TypeError(f"sparsity must be a float or a list of floats, got {type(sparsity).__name__}")
    for s, name in zip(values, names):
        if not 0.0 <= s <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} must be in [0, 1], got {s}")
    return values


def _threshold_dtype(tensors: list[Tensor]) -> torch.dtype:
    # every threshold is exact in the promoted dtype (fp16 and bf16 promote to fp32)
    return reduce(torch.promote_types, (t.dtype for t in tensors), tensors[0].dtype)


# ---------------------------------------------------------------- magnitude selection
def _select(tensors: list[Tensor], sparsities: list[float], want_masks: bool):
    device = tensors[0].device
    backend = _backend.resolve("magnitude_select", device, ("torch", "triton"))
    if backend == "triton":
        from .triton import radix_select as impl
    else:
        from .composite import radix_select as impl
    return impl.magnitude_select(tensors, sparsities, want_masks=want_masks,
                                 out_dtype=_threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_thresholds", mutates_args=())
def _magnitude_thresholds_op(tensors: list[Tensor], sparsities: list[float]) -> Tensor:
    return _select(tensors, sparsities, want_masks=False)[0]


@_magnitude_thresholds_op.register_fake
def _(tensors, sparsities):
    return tensors[0].new_empty((len(tensors),), dtype=_threshold_dtype(tensors))


@torch.library.custom_op("dsd_kernels::magnitude_mask_words", mutates_args=())
def _magnitude_mask_words_op(tensors: list[Tensor], sparsities: list[float]) -> list[Tensor]:
    return _select(tensors, sparsities, want_masks=True)[1]


@_magnitude_mask_words_op.register_fake
def _(tensors, sparsities):
    out = []
    for t in tensors:
        rows, cols = mask_rows_cols(t.shape)
        out.append(t.new_empty((rows, (cols + 31) // 32), dtype=torch.int32))
    return out


def magnitude_thresholds(tensors, sparsity) -> Tensor:
    """Exact per-tensor magnitude thresholds: the k-th smallest |w|, k = round(s * numel).

    tensors: a float tensor or a list of them (one device; any shapes and float dtypes).
    sparsity: one float in [0, 1] for all tensors, or one per tensor.
    Returns a 1-D tensor with one threshold per tensor (-inf where k == 0), in the
    promoted dtype of the inputs, on their device. NaN ranks above +inf; -0.0 == 0.0.
    """
    tensors = _as_tensor_list(tensors)
    sparsities = _sparsity_list(sparsity, len(tensors))
    if not tensors:
        return torch.empty(0)
    _check_float_same_device(tensors)
    return torch.ops.dsd_kernels.magnitude_thresholds([t.detach() for t in tensors], sparsities)


def magnitude_masks(tensors, sparsity) -> list[Mask]:
    """Exact magnitude masks: per tensor, the k = round(s * numel) smallest |w| are pruned.

    Ties in |w| are pruned lowest flat index first, so exactly k weights are pruned
    whatever the values (all-equal weights included). Returns one packed Mask per tensor.
    """
    tensors = _as_tensor_list(tensors)
    sparsities = _sparsity_list(sparsity, len(tensors))
    if not tensors:
        return []
    _check_float_same_device(tensors)
    words = torch.ops.dsd_kernels.magnitude_mask_words([t.detach() for t in tensors], sparsities)
    return [Mask(w, t.shape) for w, t in zip(words, tensors)]
