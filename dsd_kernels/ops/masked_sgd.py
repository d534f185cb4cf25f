"""One fused masked SGD step over many parameters: `masked_sgd_` (custom op
`dsd_kernels::masked_sgd_`)."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backend
from .._dtensor import local_tensor
from .._floatbits import KEY_SPECS
from ..masks import as_mask, packed_shape
from ._common import any_dtensor, as_tensor_list, check_kernel_tensors, check_writable, dtypes_of, kernel_layout

__all__ = ["masked_sgd_", "check_sgd_hyperparameters"]


def check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """The checks (and messages) of torch.optim.SGD's constructor."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")



def _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum, *, real) -> None:
    """The checks of the masked_sgd_ op's real and fake implementations."""
    torch._check_value(len(params) == len(grads) == len(mask_words),
                       lambda: f"masked_sgd_: params, grads and mask_words have lengths "
                               f"{len(params)}, {len(grads)}, {len(mask_words)}")
    want = len(params) if momentum != 0 else 0
    torch._check_value(len(momentum_buffers) == len(first_step) == want,
                       lambda: f"masked_sgd_: momentum_buffers and first_step need {want} entries "
                               f"(momentum={momentum}), got {len(momentum_buffers)}, {len(first_step)}")
    for i, p in enumerate(params):
        for ok, error, message in _sgd_tensor_checks(i, p, grads[i], momentum_buffers[i] if want else None,
                                                     mask_words[i], params[0].device):
            if not ok:  # plain tests first: torch._check per tensor would cost a step's 15%
                (torch._check_type if error is TypeError else torch._check_value)(False, message)
    check_kernel_tensors("masked_sgd_", (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers),
                                         ("mask_words", mask_words)), ("params", "momentum_buffers"), real=real)


def _sgd_tensor_checks(i, p, g, b, words, device):
    """(holds, error type, message) of every check on parameter i's tensors."""
    yield p.dtype in KEY_SPECS, TypeError, lambda: f"params[{i}] has dtype {p.dtype}; SGD needs floating parameters"
    yield (g.shape == p.shape and g.dtype == p.dtype and g.device == p.device, ValueError,
           lambda: f"grads[{i}] ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match params[{i}] "
                   f"({tuple(p.shape)}, {p.dtype}, {p.device})")
    yield p.device == device, ValueError, lambda: f"params[{i}] is on {p.device} but params[0] is on {device}"
    if b is not None:
        yield (b.shape == p.shape and b.dtype == p.dtype and b.device == p.device, ValueError,
               lambda: f"momentum_buffers[{i}] does not match params[{i}] in shape, dtype or device")
    if words is not None:
        yield (words.dtype == torch.int32 and tuple(words.shape) == packed_shape(p.shape)
               and words.device == p.device, ValueError,
               lambda: f"mask_words[{i}] ({tuple(words.shape)}, {words.dtype}) does not fit params[{i}]: "
                       f"expected int32 {packed_shape(p.shape)} on {p.device}")


@torch.library.custom_op("dsd_kernels::masked_sgd_", mutates_args=("params", "momentum_buffers"))
def _masked_sgd_op(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                   mask_words: List[Optional[Tensor]], first_step: List[bool], lr: float,
                   momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                   maximize: bool, torch_fused: bool = False) -> None:
    _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum, real=True)
    if not params:
        return
    impl = _backend.implementation("masked_sgd", params[0].device, dtypes_of(params),
                                   "fused" if torch_fused else "foreach")
    impl.masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, lr=lr,
                     momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     nesterov=nesterov, maximize=maximize, torch_fused=torch_fused)


@_masked_sgd_op.register_fake
def _(params, grads, momentum_buffers, mask_words, first_step, lr, momentum, dampening,
      weight_decay, nesterov, maximize, torch_fused=False):
    _check_sgd_args(params, grads, momentum_buffers, mask_words, first_step, momentum, real=False)
    return None

def masked_sgd_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0, dampening=0.0,
                weight_decay=0.0, nesterov=False, maximize=False, torch_fused=False) -> None:
    """One fused masked SGD step over a list of parameters, in place.

    torch.optim.SGD's arithmetic exactly (grad -> maximize -> weight decay -> momentum ->
    nesterov -> update, each as torch computes it: fp32/fp64 results are bit-identical on CPU
    to torch.optim.SGD's single-tensor and foreach steps, or with torch_fused=True to its fused
    kernel) on the masked gradient; pruned weights and their momentum are set to exactly 0. params, grads: tensors or iterables of them. masks: None (all dense), or
    one per parameter: a Mask, a bool or 0/1 float tensor (True/1 = kept; over the
    parameter's logical shape, whatever its memory order), or None (dense).
    momentum_buffers: None, or one per parameter: a tensor, or None to create it on this
    step (as torch does: the first buffer is the gradient itself, in the parameter's memory
    format); created buffers are written into the list. All tensors of a parameter on one
    device; parameters may be non-contiguous (channels_last steps in its memory order, with
    no copy), complex (stepped through their real view; a mask covers each complex element)
    or have sparse gradients (densified for the step).
    """
    params = as_tensor_list(params, "params")
    grads = as_tensor_list(grads, "grads")
    masks = [None] * len(params) if masks is None else list(masks)
    momentum_buffers = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    if not len(params) == len(grads) == len(masks) == len(momentum_buffers):
        raise ValueError(f"params, grads, momentum_buffers and masks must have equal lengths, got "
                         f"{len(params)}, {len(grads)}, {len(momentum_buffers)}, {len(masks)}")
    check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    if not params:
        return
    fresh: set[int] = set()  # buffers created here: their first step copies the gradient
    if any_dtensor(params):
        # sharded params (FSDP2): step each rank's local shard in place with its local mask;
        # new momentum buffers are DTensors like their params, so checkpoints stay sharded
        for i, p in enumerate(params):
            if momentum != 0 and momentum_buffers[i] is None:
                momentum_buffers[i] = torch.zeros_like(p)
                fresh.add(i)
        params = [local_tensor(p) for p in params]
        grads = [local_tensor(g) for g in grads]
        momentum_buffers = [None if b is None else local_tensor(b) for b in momentum_buffers]
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} and dtype {g.dtype} but "
                             f"params[{i}] has {tuple(p.shape)} and {p.dtype}")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"params[{i}] has dtype {p.dtype}; SGD needs floating or complex parameters")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
    # complex parameters and sparse gradients: torch's own arithmetic (complex products rounded
    # apart, an uncoalesced gradient added entry by entry), then the pruned entries zeroed
    by_torch = [i for i, (p, g) in enumerate(zip(params, grads)) if p.is_complex() or g.layout != torch.strided]
    if by_torch:
        _torch_arithmetic_step(by_torch, params, grads, momentum_buffers, masks, lr=lr, momentum=momentum,
                               dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    # per device (the kernels take one device per call), each parameter as a contiguous
    # real tensor: its storage-order view where it has one, a copy written back otherwise
    by_device: dict[torch.device, list[int]] = {}
    skip = set(by_torch)
    for i, p in enumerate(params):
        if i not in skip:
            by_device.setdefault(p.device, []).append(i)
    for device, index in by_device.items():
        steps, write_back, first, words = [], [], [], []
        for i in index:
            p, g, buf = params[i].detach(), grads[i], momentum_buffers[i]
            mask = None if masks[i] is None else as_mask(masks[i], p, f"masks[{i}]")
            if g.layout != torch.strided:
                g = g.coalesce().to_dense() if g.is_sparse else g.to_dense()
            if momentum != 0:
                if buf is None:
                    buf = momentum_buffers[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    first.append(True)
                else:
                    if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        raise ValueError(f"momentum_buffers[{i}] does not match params[{i}] in "
                                         f"shape, dtype or device")
                    first.append(i in fresh)
                buf = buf.detach()
            check_writable(((f"params[{i}]", p), (f"momentum_buffers[{i}]", buf)))
            p, mask, (g, buf) = kernel_layout(p, mask, (g, buf), write_back, read_only=1)
            steps.append((p, g, buf))
            words.append(None if mask is None else mask.packed)
        torch.ops.dsd_kernels.masked_sgd_([p for p, _, _ in steps], [g for _, g, _ in steps],
                                          [b for _, _, b in steps if b is not None], words, first,
                                          float(lr), float(momentum), float(dampening),
                                          float(weight_decay), bool(nesterov), bool(maximize),
                                          bool(torch_fused))
        for target, stepped in write_back:
            target.copy_(stepped)



def _torch_arithmetic_step(index, params, grads, momentum_buffers, masks, **hyper) -> None:
    """torch.optim.SGD's single-tensor step (its functional form) on params[index], then their
    pruned entries zeroed, momentum buffers included (a sparse buffer, as torch keeps one for
    sparse gradients, through its values). Created buffers are written into momentum_buffers."""
    from torch.optim.sgd import sgd as torch_sgd

    from .apply_masks import apply_masks_

    bufs = [momentum_buffers[i] for i in index]
    sub_grads = [grads[i] for i in index]
    with torch.no_grad():
        torch_sgd([params[i].detach() for i in index], sub_grads, bufs, foreach=False,
                  has_sparse_grad=any(g.layout != torch.strided for g in sub_grads), **hyper)
        dense, dense_masks = [], []  # masked in one apply_masks_ call
        for k, i in enumerate(index):
            if hyper["momentum"] != 0:
                momentum_buffers[i] = bufs[k]
            if masks[i] is None:
                continue
            mask = as_mask(masks[i], params[i], f"masks[{i}]")
            for t in [params[i].detach()] + ([] if bufs[k] is None or bufs[k].is_sparse else [bufs[k]]):
                dense.append(t)
                dense_masks.append(mask)
            if bufs[k] is not None and bufs[k].is_sparse:
                _zero_pruned_entries_of_sparse(bufs[k], mask.to_bool().to(bufs[k].device))
        apply_masks_(dense, dense_masks)


def _zero_pruned_entries_of_sparse(t: Tensor, keep: Tensor) -> None:
    """The pruned entries of a sparse COO tensor set to +0 in place, through its values (so the
    kept ones keep their bits and the tensor its structure)."""
    values = t._values()
    kept = keep[tuple(t._indices())]  # (nnz, *dense dims)
    if values.is_complex():
        values = torch.view_as_real(values)
        kept = kept.unsqueeze(-1).expand(values.shape)
    values.masked_fill_(~kept, 0)
