"""The bench case of RigL/SET's mask update (ops.mask_update): one update of ResNet-50's weights
against a per-layer torch.topk peer, with an abs pass over the weights and gradients beside it."""
from __future__ import annotations

import torch

from .model_shapes import resnet50_weight_shapes
from .timing import Case


def mask_update_cases(device: str) -> list[Case]:
    """One RigL update of ResNet-50's weights at 80% sparsity (30% of each layer's kept weights
    dropped and as many grown by |gradient|) against a per-layer torch.topk peer (the way the
    PyTorch RigL ports choose), with one torch.abs(out=) pass over the weights and one over the
    gradients beside it (the issue's scale: one pass reading both)."""
    from ... import ops

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen).to(device) for s in resnet50_weight_shapes()]
    grads = [torch.randn(s, generator=gen).to(device) for s in resnet50_weight_shapes()]
    masks = ops.magnitude_masks(weights, 0.8)
    counts = [round(0.3 * m.count()) for m in masks]
    keeps = [m.to_bool() for m in masks]
    total = sum(w.numel() for w in weights)

    def topk_peer():
        out = []
        for w, g, keep, k in zip(weights, grads, keeps, counts):
            dropped = torch.where(keep, w.abs(), torch.inf).reshape(-1).topk(k, largest=False).indices
            grown = torch.where(keep, -torch.inf, g.abs()).reshape(-1).topk(k).indices
            new = keep.reshape(-1).clone()
            new[dropped] = False
            new[grown] = True
            out.append(new)
        return out

    buffers = [torch.empty_like(w) for w in weights + grads]

    def abs_both():
        for t, buf in zip(weights + grads, buffers):
            torch.abs(t, out=buf)

    return [Case("mask_update", f"ResNet-50 weights ({total / 1e6:.1f}M, {len(weights)} layers), 80% sparse, "
                 f"30% moved", 2 * total * 4 + total // 4,
                 ours=lambda: ops.mask_update(weights, grads, masks, counts),
                 baselines={"per-layer torch.topk over where(mask, |x|, inf)": topk_peer},
                 references={"torch.abs(out=) over weights and gradients": (abs_both, 4 * total * 4)})]
