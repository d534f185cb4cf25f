"""MaskedAdamW as torch.optim.AdamW, over the inputs PyTorch tests AdamW with (optim_db): every
config and flag bit for bit, masked invariants, errors, checkpoints, the DSD schedule."""
import io

import pytest
import torch

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW

from .drop_in import (assert_pruned_exactly_zero, check_error_input, fresh_kwargs, same_bits,
                      step_masked_beside_torch)

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test inputs need expecttest")
ADAMW_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.AdamW)
CONFIGS = ADAMW_INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
IMPLS = [{}, {"foreach": True}, {"fused": True}]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype))
            for s in ((33, 70), (17,), (8, 3, 3, 3))]


def set_grads(params, step, keeps=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if keeps is not None and keeps[i] is not None:
            grad = torch.where(keeps[i], grad, torch.zeros_like(grad))
        p.grad = grad


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_torch_config_is_bit_identical_without_masks(dtype, config, impl):
    ours, theirs = make_params(dtype), make_params(dtype)
    a = MaskedAdamW(ours, **fresh_kwargs(config.kwargs), **impl)
    b = torch.optim.AdamW(theirs, **fresh_kwargs(config.kwargs), **impl)
    for step in range(3):
        set_grads(ours, step)
        set_grads(theirs, step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
def test_with_masks_kept_weights_are_adamw_on_masked_gradients(config, impl):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opt, _, keeps = step_masked_beside_torch(MaskedAdamW, torch.optim.AdamW, {**config.kwargs, **impl}, ours,
                                             theirs, set_grads)
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())
    assert_pruned_exactly_zero(opt, ours, keeps)


@pytest.mark.parametrize("error", ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_every_torch_error_input_raises_the_same(error):
    check_error_input(MaskedAdamW, error, common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR)


def test_state_dicts_load_both_ways_and_masks_load_weights_only():
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    a = MaskedAdamW(ours, lr=1e-2)
    a.prune(0.5)
    set_grads(ours, 0)
    a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = torch.optim.AdamW(theirs, lr=1e-2)
    b.load_state_dict(state)  # our extra "masks" entry is ignored by AdamW
    c = MaskedAdamW(make_params(torch.float32), lr=1e-2)
    c.load_state_dict(state)
    assert len(c.masks) == 2 and set(c.param_groups[0]) == set(b.param_groups[0])


def test_a_grad_scaler_skipped_step_changes_nothing():
    params = make_params(torch.float32)
    opt = MaskedAdamW(params, lr=1e-2, fused=True)
    opt.prune(0.5)
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_dsd_scheduler_drives_masked_adamw_and_channels_last_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))
    model = model.to(memory_format=torch.channels_last)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dsd = DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    zeros = []
    for epoch in range(dsd.total_epochs):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        zeros.append([int((m.weight == 0).sum()) for m in (model[0], model[2])])
        dsd.step()
    assert zeros[1] == [round(0.5 * model[0].weight.numel()), round(0.5 * model[2].weight.numel())]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(z < e for z, e in zip(zeros[2], zeros[1]))  # pruned weights train again
