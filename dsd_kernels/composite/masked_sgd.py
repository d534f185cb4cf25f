"""Masked SGD with torch's foreach ops: torch.optim.SGD's multi-tensor arithmetic on
masked gradients, then the pruned weights and momentum are zeroed in place.

Masks arrive packed (int32 words or None); they are unpacked once per step.
"""
from __future__ import annotations

import torch

from ..masks import unpack_bool


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize) -> None:
    """All lists of equal length; momentum_buffers are tensors (first_step[i]: buffer is new)."""
    if not params:
        return
    keeps = [None if w is None else unpack_bool(w, p.shape) for w, p in zip(mask_words, params)]
    with torch.no_grad():
        grads = [g if k is None else torch.where(k, g, torch.zeros_like(g)) for g, k in zip(grads, keeps)]
        if maximize:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            old = [i for i, first in enumerate(first_step) if not first]
            for i, first in enumerate(first_step):
                if first:
                    momentum_buffers[i].copy_(grads[i])
            if old:
                bufs = [momentum_buffers[i] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
            if nesterov:
                grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
            else:
                grads = momentum_buffers
        torch._foreach_add_(params, grads, alpha=-lr)
        for i, keep in enumerate(keeps):
            if keep is not None:
                params[i].masked_fill_(~keep, 0)
                if momentum != 0:
                    momentum_buffers[i].masked_fill_(~keep, 0)
