"""Reference masked SGD: torch.optim.SGD's per-tensor arithmetic (`_single_tensor_sgd`)
on masked gradients, then pruned weights and their momentum set to exactly 0.

`keep_masks[i]` is a bool tensor of the parameter's shape (True = kept) or None (dense).
`momentum_buffers[i]` may be None: it is created (grad, no dampening) as torch does and
written back into the list. Runs in the caller's grad mode: under torch.no_grad() for a plain
step, with autograd on for a differentiable one (as SGD's differentiable mode).
"""
from __future__ import annotations

import torch


def masked_sgd_(params, grads, momentum_buffers, keep_masks, *, lr, momentum, dampening,
                weight_decay, nesterov, maximize) -> None:
    lr = float(lr)
    for i, param in enumerate(params):
        keep = keep_masks[i]
        grad = grads[i] if not maximize else -grads[i]
        if keep is not None:
            grad = torch.where(keep, grad, torch.zeros_like(grad))
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.clone(grad).detach()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)
        if keep is not None:
            param.masked_fill_(~keep, 0)
            if momentum != 0:
                momentum_buffers[i].masked_fill_(~keep, 0)
