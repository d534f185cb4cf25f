"""The host-bound optimizer step: many small tensors, where a step's time is the host's work
around the kernels, not the kernels. Each masked step against torch's fused step of the same
optimizer (the fastest step torch has), one thread, alternating rounds in one process."""
from __future__ import annotations

import torch

from .timing import Case, single_threaded

# 148 fp32 tensors (50 of 64x64, 98 of 64): a small model's weights and biases
HOST_STEP_SHAPES = [(64, 64)] * 50 + [(64,)] * 98


def host_step_cases(device: str) -> list[Case]:
    """Per optimizer, ours (50% masks on the 2-D tensors, steady state) against torch's fused
    step of the same optimizer without masks. bytes_moved: what the step reads and writes."""
    from ...optim import MaskedAdamW, MaskedSGD, OptimizerMasks

    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen) for s in HOST_STEP_SHAPES]
    keeps = [(torch.rand(s, generator=gen) > 0.5) if len(s) == 2 else None for s in HOST_STEP_SHAPES]
    numel = sum(v.numel() for v in values)

    def params():
        out = [torch.nn.Parameter(v.to(device)) for v in values]
        for p in out:
            p.grad = torch.randn_like(p)
        return out

    def masked(opt, ps):
        opt.set_masks({p: k.to(device) for p, k in zip(ps, keeps) if k is not None})
        return opt

    def with_optimizer_masks(opt, ps):
        masks = OptimizerMasks(opt)
        masks.set_masks({p: k.to(device) for p, k in zip(ps, keeps) if k is not None})
        return opt

    pairs = [
        ("MaskedSGD(momentum=0.9)", lambda ps: masked(MaskedSGD(ps, lr=0.01, momentum=0.9), ps),
         "SGD(momentum=0.9, fused=True)", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True), 5),
        ("MaskedSGD(momentum=0.9, fused=True)",
         lambda ps: masked(MaskedSGD(ps, lr=0.01, momentum=0.9, fused=True), ps),
         "SGD(momentum=0.9, fused=True)", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True), 5),
        ("MaskedAdamW()", lambda ps: masked(MaskedAdamW(ps), ps),
         "AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, fused=True), 7),
        ("MaskedAdamW(fused=True)", lambda ps: masked(MaskedAdamW(ps, fused=True), ps),
         "AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, fused=True), 7),
        ("Adam(fused=True) + OptimizerMasks",
         lambda ps: with_optimizer_masks(torch.optim.Adam(ps, fused=True), ps),
         "Adam(fused=True)", lambda ps: torch.optim.Adam(ps, fused=True), 7),
    ]
    cases = []
    for ours_name, make_ours, torch_name, make_torch, tensors_moved in pairs:
        ours, theirs = make_ours(params()), make_torch(params())
        for opt in (ours, theirs):
            opt.step()  # the state exists: the steady state is timed
        cases.append(Case("host-bound step", f"{ours_name}, {len(values)} fp32 tensors, one thread",
                          numel * 4 * tensors_moved, ours=single_threaded(ours.step),
                          baselines={torch_name: single_threaded(theirs.step)}))
    return cases
