"""Masked AdamW from torch ops: torch's own AdamW step (its foreach ops, or with
torch_fused=True its fused kernel, so the bits are those of torch.optim.AdamW with the same
flags), then the pruned entries of the weights and moments zeroed by a bitwise AND (the update
is elementwise: the kept entries are what AdamW computes on the masked gradient). Per step:
torch's step, then one AND pass over the masked weights and their moments."""
from __future__ import annotations

from ._mask_cache import apply_and_


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, torch_fused=False, static_key=None) -> None:
    from torch.optim.adamw import adamw
    adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
          foreach=not torch_fused, fused=torch_fused or None, amsgrad=amsgrad, beta1=beta1, beta2=beta2,
          lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize)
    for i, w in enumerate(mask_words):
        if w is not None:
            for t in (params[i], exp_avgs[i], exp_avg_sqs[i]) + ((max_exp_avg_sqs[i],) if amsgrad else ()):
                apply_and_(t, w)
