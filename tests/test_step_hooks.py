"""Step pre- and post-hooks (the optimizer's own and the global ones) run exactly once per step
for every optimizer class we ship, whatever path the step takes (our kernels, or torch's own step
for differentiable, capturable or tensor-lr groups), and around OptimizerMasks."""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dsd_kernels.optim import MaskedAdamW, MaskedSGD, OptimizerMasks

CONFIGS = [
    (MaskedSGD, dict(lr=0.1, momentum=0.9)),
    (MaskedSGD, dict(lr=0.1, momentum=0.9, differentiable=True)),
    (MaskedSGD, dict(lr=0.1, momentum=0.9, fused=True)),
    (MaskedSGD, dict(lr=torch.tensor(0.1), momentum=0.9)),
    (MaskedAdamW, dict(lr=1e-2)),
    (MaskedAdamW, dict(lr=1e-2, differentiable=True)),
    (MaskedAdamW, dict(lr=1e-2, fused=True)),
    (MaskedAdamW, dict(lr=torch.tensor(1e-2))),
] + ([(MaskedAdamW, dict(lr=1e-2, capturable=True))] if torch.cuda.is_available() else [])


def _count_hooks(opt, params, steps=2):
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={v}" for k, v in v.items() if k != "lr") or "default")
def test_hooks_run_once_per_step(cpu_backend, cls, kwargs):
    # plain instances of torch's classes first: torch hooks each class's step once one exists,
    # which is when calling the parent's step from ours would run the hooks twice
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
    params = [torch.nn.Parameter(torch.randn(8, 40)), torch.nn.Parameter(torch.randn(8))]
    if kwargs.get("differentiable"):  # as torch's differentiable tests: non-leaf parameters
        params = [p.clone() for p in params]
    opt = cls(params, **kwargs)
    opt.prune(0.5)
    assert _count_hooks(opt, params) == ["global pre", "pre", "post", "global post"] * 2


def test_hooks_run_once_around_optimizer_masks(cpu_backend):
    params = [torch.nn.Parameter(torch.randn(8, 40))]
    opt = torch.optim.Adam(params, lr=1e-2)
    masks = OptimizerMasks(opt)
    masks.set_masks({params[0]: torch.rand(8, 40) > 0.5})
    calls = _count_hooks(opt, params)
    assert calls.count("pre") == 2 and calls.count("post") == 2 and calls.count("global pre") == 2
