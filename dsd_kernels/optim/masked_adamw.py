"""MaskedAdamW: torch.optim.AdamW whose pruned weights and moments stay exactly 0.

Its step is torch.optim.AdamW's own (every flag: foreach, fused, capturable, differentiable,
tensor lr, GradScaler; so the kept weights carry AdamW's bits exactly) followed by one fused
multi-tensor re-masking pass (`ops.apply_masks_`) over the masked weights and their state
(exp_avg, exp_avg_sq, max_exp_avg_sq): AdamW is elementwise, so the kept entries are what
AdamW computes on `grad * mask`, and the pruned ones are exactly +0 whatever the gradient held.
The re-masking costs one extra read and write of the masked weights and moments per step; a
single fused masked AdamW kernel (no extra pass) is not written yet.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..masks import Mask
from ._masked_params import MaskedParams
from .masking import state_tensors, zero_pruned


class MaskedAdamW(MaskedParams, torch.optim.AdamW):
    """torch.optim.AdamW (same constructor, defaults, errors, param groups, hooks, schedulers,
    GradScaler, state_dict) with per-parameter binary masks: set_masks, clear_masks, masks,
    prune(sparsity, model=..., include=..., exclude=..., scope=...)."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused)
        self._masks: dict[Tensor, Mask] = {}

    def step(self, closure=None):
        loss = super().step(closure)
        if self._masks:
            if self.defaults["differentiable"]:  # keep the re-masking on the autograd graph
                for p, m in self._masks.items():
                    keep = m.to_bool().to(p.device)
                    p.masked_fill_(~keep, 0)
                    with torch.no_grad():
                        for v in state_tensors(self, p):
                            v.masked_fill_(~keep, 0)
            else:
                zero_pruned(self, self._masks, params=True)
        return loss
