"""Masked AdamW, per tensor, obviously right: torch.optim.AdamW's `_single_tensor_adamw`
arithmetic op for op, then the pruned entries of the weight and of every moment set to +0 (so
no pruned gradient survives in the state)."""
from __future__ import annotations

import torch


@torch.no_grad()
def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, keeps, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize) -> None:
    """keeps: one bool tensor (True = kept) or None (dense) per parameter."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        state_steps[i] += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state_steps[i].item()
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        second = exp_avg_sq
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if keeps[i] is not None:
            pruned = ~keeps[i]
            for t in (param, exp_avg, exp_avg_sq) + ((max_exp_avg_sqs[i],) if amsgrad else ()):
                t.masked_fill_(pruned, 0)
