"""y = x (W*M)^T + b with autograd, skipping pruned tiles: `masked_linear` (custom ops
`dsd_kernels::masked_linear` and `::masked_linear_backward`)."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._floatbits import KEY_SPECS
from ..masks import as_mask, packed_shape

__all__ = ["masked_linear", "mask_words_for_weight"]


def _check_linear_args(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> None:
    """The checks of the masked_linear ops' real and fake implementations."""
    torch._check_value(weight.dim() == 2, lambda: f"weight must be 2-D (out_features, in_features), "
                                                  f"got shape {tuple(weight.shape)}")
    torch._check_value(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                       lambda: f"x has {x.shape[-1] if x.dim() else 0} features in its last dim but "
                               f"weight expects in_features={weight.shape[1]}")
    torch._check_type(x.dtype == weight.dtype and x.dtype in KEY_SPECS,
                      lambda: f"x is {x.dtype} and weight is {weight.dtype}; they must be one float dtype")
    torch._check_value(x.device == weight.device, lambda: f"x is on {x.device} but weight is on {weight.device}")
    torch._check_value(mask_words.dtype == torch.int32 and tuple(mask_words.shape) == packed_shape(weight.shape)
                       and mask_words.device == weight.device,
                       lambda: f"mask_words ({tuple(mask_words.shape)}, {mask_words.dtype}, "
                               f"{mask_words.device}) does not fit weight {tuple(weight.shape)}: "
                               f"expected int32 {packed_shape(weight.shape)} on {weight.device}")
    if bias is not None:
        torch._check_value(bias.shape == (weight.shape[0],) and bias.dtype == weight.dtype
                           and bias.device == weight.device,
                           lambda: f"bias must be a {weight.dtype} tensor of shape ({weight.shape[0]},) "
                                   f"on {weight.device}, got {tuple(bias.shape)} {bias.dtype} {bias.device}")


def _check_linear_grad(grad: Tensor, x: Tensor, weight: Tensor) -> None:
    expected = (*x.shape[:-1], weight.shape[0])
    torch._check_value(tuple(grad.shape) == expected and grad.dtype == weight.dtype and grad.device == weight.device,
                       lambda: f"grad ({tuple(grad.shape)}, {grad.dtype}, {grad.device}) must have the output's "
                               f"shape {expected}, dtype {weight.dtype} and device {weight.device}")


def _as_rows(t: Tensor) -> Tensor:
    """(..., features) as a contiguous (rows, features) matrix; zero rows or features included."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def _linear_impl(x2d: Tensor):
    return _backend.implementation("masked_linear", x2d.device, (x2d.dtype,))


@torch.library.custom_op("dsd_kernels::masked_linear", mutates_args=())
def _masked_linear_op(x: Tensor, weight: Tensor, mask_words: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check_linear_args(x, weight, mask_words, bias)
    x2d = _as_rows(x)
    if x2d.numel() == 0:  # no input rows or in_features == 0: y is the bias (or 0), as F.linear gives
        y = x2d.new_zeros((x2d.shape[0], weight.shape[0]))
        if bias is not None:
            y += bias
    else:
        # every tensor dense for the kernels (a bias may be expanded, a weight transposed)
        y = _linear_impl(x2d).forward(x2d, weight.contiguous(), mask_words.contiguous(),
                                      None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_masked_linear_op.register_fake
def _(x, weight, mask_words, bias):
    _check_linear_args(x, weight, mask_words, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("dsd_kernels::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, mask_words: Tensor,
                               needs_input: bool, needs_weight: bool, needs_bias: bool
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dX like x, dW like weight, db (out,)); an unneeded gradient comes back empty."""
    _check_linear_args(x, weight, mask_words, None)
    _check_linear_grad(grad, x, weight)
    g2d = _as_rows(grad)
    x2d = _as_rows(x)
    if x2d.numel() == 0:  # nothing to multiply: dX is empty or 0, dW is 0
        dx = torch.zeros_like(x2d) if needs_input else None
        dw = torch.zeros_like(weight) if needs_weight else None
    else:
        dx, dw = _linear_impl(x2d).backward(g2d, x2d, weight.contiguous(), mask_words.contiguous(),
                                            needs_input, needs_weight)
    dx = dx.reshape(x.shape) if dx is not None else x.new_empty(0)
    dw = dw if dw is not None else weight.new_empty(0)
    db = g2d.sum(0) if needs_bias else weight.new_empty(0)
    return dx, dw, db


@_masked_linear_backward_op.register_fake
def _(grad, x, weight, mask_words, needs_input, needs_weight, needs_bias):
    _check_linear_args(x, weight, mask_words, None)
    _check_linear_grad(grad, x, weight)
    return (x.new_empty(x.shape if needs_input else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            weight.new_empty((weight.shape[0],) if needs_bias else (0,)))


def _masked_linear_setup_context(ctx, inputs, output):
    x, weight, mask_words, bias = inputs
    ctx.save_for_backward(x, weight, mask_words)
    ctx.has_bias = bias is not None


def _masked_linear_backward(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    needs_x, needs_w, _, needs_b = ctx.needs_input_grad
    dx, dw, db = torch.ops.dsd_kernels.masked_linear_backward(
        grad, x, weight, mask_words, needs_x, needs_w, bool(ctx.has_bias and needs_b))
    return (dx if needs_x else None, dw if needs_w else None, None,
            db if ctx.has_bias and needs_b else None)


torch.library.register_autograd("dsd_kernels::masked_linear", _masked_linear_backward,
                                setup_context=_masked_linear_setup_context)


def mask_words_for_weight(mask, weight: Tensor, name: str = "mask") -> Tensor:
    """Packed int32 words for `weight` from a Mask, a bool or 0/1 float tensor, or packed words."""
    if isinstance(mask, Tensor) and mask.dtype == torch.int32:
        if tuple(mask.shape) != packed_shape(weight.shape):
            raise ValueError(f"{name} (packed words) has shape {tuple(mask.shape)}, expected "
                             f"{packed_shape(weight.shape)} for a weight of shape {tuple(weight.shape)}")
        words = mask
    else:
        if mask is None:
            raise TypeError(f"{name} must be a Mask, a bool tensor or packed int32 words, got None")
        words = as_mask(mask, weight, name).packed
    if words.device != weight.device:
        raise ValueError(f"{name} is on {words.device} but weight is on {weight.device}")
    return words


def masked_linear(x: Tensor, weight: Tensor, mask, bias: Tensor | None = None) -> Tensor:
    """y = x @ (W*M)^T + b without materialising W*M on GPU; differentiable in x, W and b.

    x: (..., in_features); weight: (out_features, in_features); mask: a Mask, a bool or 0/1
    float tensor of weight's shape (True/1 = kept), or its packed int32 words; bias: (out,)
    or None. Backward: dX = dY @ (W*M), dW = (dY^T @ X) * M (exactly 0 where pruned), db = sum dY.
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features in its last dim but "
                         f"weight expects in_features={weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; they must match")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device} but weight is {weight.dtype} "
                            f"on {weight.device}")
    words = mask_words_for_weight(mask, weight)
    return torch.ops.dsd_kernels.masked_linear(x, weight, words, bias)
