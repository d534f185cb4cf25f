"""Masked SGD from torch ops: torch's own SGD arithmetic (its foreach ops, or with
torch_fused=True its fused kernel `torch._fused_sgd_`, so the bits are those of
torch.optim.SGD with the same flags), then the pruned weights and momentum are zeroed by a
bitwise AND on the bits.

The update is elementwise, so kept entries never see the pruned ones: stepping on the raw
gradient and then zeroing the pruned entries of the weights and momentum gives exactly
the masked-gradient result, without a masked copy of every gradient. AND-ing with
0 / all-ones words gives exactly +0.0 at pruned positions whatever was computed there
(NaN and inf included) and leaves kept values bit-identical; on CPU it is a cheap
vectorised pass, where masked_fill_/where are several times slower. The unpacked 0/-1
words (one int per masked weight: the memory this fallback trades for speed) are cached
per packed mask, keyed weakly on the mask tensor and its version counter.
Per step: the fused step, then two in-place AND passes.
"""
from __future__ import annotations

import torch

from ._mask_cache import apply_and_


def _foreach_sgd(params, grads, bufs, first, *, lr, momentum, dampening, weight_decay, nesterov,
                 maximize):
    """torch.optim.SGD's multi-tensor arithmetic (the fallback where _fused_sgd_ is missing)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if first:
            for b, g in zip(bufs, grads):
                b.copy_(g)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)


def _single_tensor_sgd(params, grads, bufs, first, *, lr, momentum, dampening, weight_decay, nesterov,
                       maximize):
    """torch.optim.SGD's single-tensor arithmetic (its default on CPU): for fp16/bf16 it rounds
    otherwise than the foreach ops (their scalar multiply takes the scalar in the tensor's dtype)."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = grad if not maximize else -grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if first:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _sgd(params, grads, bufs, first, torch_fused, **hyper):
    fused = getattr(torch, "_fused_sgd_", None)
    # torch 2.13's CPU fused kernel departs from SGD's arithmetic for fp16/bf16 (0.7 apart
    # from SGD(foreach=False) after 4 steps in our tests), so low precision takes foreach
    if torch_fused and fused is not None and params[0].dtype in (torch.float32, torch.float64):
        try:
            fused(params, grads, bufs if hyper["momentum"] != 0 else [], is_first_step=first, **hyper)
            return
        except (RuntimeError, NotImplementedError):
            pass  # no fused kernel for this device/dtype in this torch: foreach gives the same math
    if params[0].dtype in (torch.float16, torch.bfloat16) and not params[0].is_cuda:
        _single_tensor_sgd(params, grads, bufs, first, **hyper)
    else:
        _foreach_sgd(params, grads, bufs, first, **hyper)


def sgd_groups(params, first_step, momentum) -> list[tuple[bool, list[int] | None]]:
    """[(first, index)]: the tensors that one fused (or foreach) call steps together, by dtype
    and first step; index None where one call takes every tensor in order."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, momentum != 0 and first_step[i]), []).append(i)
    if len(groups) == 1:
        return [(first, None) for (_, first) in groups]
    return [(first, index) for (_, first), index in groups.items()]


def sgd_steps(params, grads, momentum_buffers, first_step, torch_fused, groups=None, **hyper) -> None:
    """torch's SGD step without masks: one fused (or foreach) call per (dtype, first-step) group
    (groups: sgd_groups' for these tensors, where the caller keeps them)."""
    momentum = hyper["momentum"]
    for first, index in groups if groups is not None else sgd_groups(params, first_step, momentum):
        if index is None:
            _sgd(params, grads, momentum_buffers if momentum != 0 else [], first, torch_fused, **hyper)
        else:
            _sgd([params[i] for i in index], [grads[i] for i in index],
                 [momentum_buffers[i] for i in index] if momentum != 0 else [], first, torch_fused, **hyper)


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize, torch_fused=False, static_key=None) -> None:
    """All lists of equal length (momentum_buffers/first_step empty when momentum == 0).
    static_key: accepted as the Triton launcher's (nothing here is kept between calls)."""
    if not params:
        return
    with torch.no_grad():
        sgd_steps(params, grads, momentum_buffers, first_step, torch_fused, lr=lr, momentum=momentum,
                  dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        for i, words in enumerate(mask_words):
            if words is not None:
                apply_and_(params[i], words)
                if momentum != 0:
                    apply_and_(momentum_buffers[i], words)
