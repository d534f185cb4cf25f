"""MaskedAdamW as a drop-in for torch.optim.AdamW: over the inputs PyTorch tests AdamW with
(optim_db) every config and flag bit for bit, masked invariants, errors, checkpoints, the DSD
schedule; and beyond optim_db's configs, on every CPU backend: every config and flag with masks, channels_last and strided parameters,
fp16/bf16 and complex parameters, state_dict both ways, older state formats, deepcopy, hooks,
a tensor lr with a scheduler, differentiable mode, the fused GradScaler protocol and pruning's
scope arguments; bit for bit against AdamW wherever AdamW's arithmetic is claimed."""
import io

import pytest
import torch

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW

from .conftest import DEVICE
from ._helpers.drop_in import (assert_pruned_exactly_zero, assert_same_state, check_deepcopy_and_step_hooks,
                               check_error_input, check_fused_grad_scaler_protocol,
                               check_layout_steps_in_place, check_state_dict_loads_both_ways, fresh_kwargs,
                               same_bits, step_masked_beside_torch)

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test inputs need expecttest")
ADAMW_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.AdamW)
CONFIGS = ADAMW_INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
IMPLS = [{}, {"foreach": False}, {"foreach": True}, {"fused": True}]
impl_id = lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default"  # noqa: E731

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="bitwise comparisons with torch's CPU AdamW")


def make_params(dtype, seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 3, 3, 3, generator=g).to(dtype).contiguous(memory_format=memory_format)
    return [torch.nn.Parameter(t) for t in
            (torch.randn(33, 70, generator=g).to(dtype), torch.randn(17, generator=g).to(dtype), conv,
             torch.randn(64, 96, generator=g).to(dtype))]


def set_grads(params, step, keeps=None):
    """Gradients from a per-step seed, in each parameter's dtype and memory format; +0 where
    keeps says pruned (what AdamW steps on in the comparisons)."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if keeps is not None and keeps[i] is not None:
            grad = torch.where(keeps[i], grad, torch.zeros_like(grad))
        p.grad = torch.empty_like(p).copy_(grad)


@pytest.mark.parametrize("impl", IMPLS, ids=impl_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
def test_every_config_and_flag_with_masks_on_every_cpu_backend(cpu_backend, config, impl):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opt, other, keeps = step_masked_beside_torch(MaskedAdamW, torch.optim.AdamW, {**config.kwargs, **impl},
                                                 ours, theirs, set_grads)
    assert_same_state(opt, other, ours, theirs)
    assert_pruned_exactly_zero(opt, ours, keeps)


@pytest.mark.parametrize("impl", IMPLS, ids=impl_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_params_step_like_adamw(cpu_backend, dtype, impl):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt, other, keeps = step_masked_beside_torch(MaskedAdamW, torch.optim.AdamW,
                                                 dict(lr=1e-2, weight_decay=0.1, amsgrad=True, **impl),
                                                 ours, theirs, set_grads, steps=3)
    # kept entries only: AdamW's own half-precision step turns never-updated entries into NaN
    # (eps = 1e-8 rounds to 0 in fp16, and 0 / 0), where the masked step keeps pruned ones +0
    assert_same_state(opt, other, ours, theirs, keeps)
    assert_pruned_exactly_zero(opt, ours, keeps)


@pytest.mark.parametrize("impl", IMPLS, ids=impl_id)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_channels_last_and_strided_params_step_in_place(cpu_backend, layout, impl):
    check_layout_steps_in_place(MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01, amsgrad=True, **impl),
                                layout)


@pytest.mark.parametrize("impl", IMPLS[:3], ids=impl_id)
def test_complex_params_step_like_adamw(cpu_backend, impl):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 7, dtype=torch.complex64, generator=g)
    ours_param, their_param = torch.nn.Parameter(z.clone()), torch.nn.Parameter(z.clone())
    keep = torch.rand(6, 7, generator=g) > 0.5
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, **impl)
    ours = MaskedAdamW([ours_param], **kwargs)
    ours.set_masks({ours_param: keep})  # one bit per complex element
    theirs = torch.optim.AdamW([their_param], **kwargs)
    with torch.no_grad():
        their_param.masked_fill_(~keep, 0)
    for step in range(3):
        grad = torch.randn(6, 7, dtype=torch.complex64, generator=g)
        ours_param.grad = grad.clone()
        their_param.grad = torch.where(keep, grad, torch.zeros_like(grad))
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, [ours_param], [their_param])
    assert bool((ours_param.detach()[~keep] == 0).all())


def test_fused_rejects_complex_as_adamw_fused_does():
    for cls in (torch.optim.AdamW, MaskedAdamW):
        q = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        q.grad = torch.zeros_like(q)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point"):
            cls([q], lr=0.1, fused=True).step()


@pytest.mark.parametrize("impl", IMPLS, ids=impl_id)
def test_state_dict_of_adamw_loads_here_and_back(cpu_backend, impl):
    check_state_dict_loads_both_ways(MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, **impl),
                                     lambda: make_params(torch.float32), set_grads)


def test_older_state_dict_formats_load():
    params = make_params(torch.float32)
    opt = MaskedAdamW(params, lr=1e-2)
    set_grads(params, 0)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:  # as saved before these flags existed
        for key in ("foreach", "differentiable", "fused", "maximize", "capturable", "amsgrad"):
            group.pop(key, None)
    for s in state["state"].values():  # steps saved as Python numbers
        s["step"] = float(s["step"])
    for entry in state["state"].values():  # saved before masks were per-parameter entries
        entry.pop("mask", None)
    other = MaskedAdamW(make_params(torch.float32), lr=1e-2)
    other.load_state_dict(state)
    set_grads([p for g in other.param_groups for p in g["params"]], 1)
    other.step()
    group = other.param_groups[0]
    assert group["foreach"] is None and group["maximize"] is False and group["amsgrad"] is False
    assert all(torch.is_tensor(s["step"]) and s["step"].item() == 2.0 for s in other.state.values())


def test_deepcopy_and_step_hooks(cpu_backend):
    check_deepcopy_and_step_hooks(MaskedAdamW, dict(lr=1e-2, weight_decay=0.1), lambda: make_params(torch.float32),
                                  set_grads)


def test_tensor_lr_closure_and_scheduler_step_like_adamw(cpu_backend):
    ours_params, their_params = make_params(torch.float32), make_params(torch.float32)
    ours = MaskedAdamW(ours_params, lr=torch.tensor(1e-2), weight_decay=0.1)
    theirs = torch.optim.AdamW(their_params, lr=torch.tensor(1e-2), weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ours, theirs)]
    for step in range(3):
        for params, opt, sched in ((ours_params, ours, schedules[0]), (their_params, theirs, schedules[1])):
            def closure(params=params, opt=opt):
                opt.zero_grad()
                set_grads(params, step)
                return torch.tensor(float(step))
            assert opt.step(closure).item() == step
            sched.step()
    lr = ours.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(1e-2 / 8) and torch.equal(lr, theirs.param_groups[0]["lr"])
    assert_same_state(ours, theirs, ours_params, their_params)


def test_differentiable_mode_is_traced_by_autograd():
    def step(param, grad, exp_avg, exp_avg_sq):
        p = param.clone()  # a non-leaf, as torch's own differentiable tests use
        p.grad = grad
        opt = MaskedAdamW([p], lr=0.1, weight_decay=0.1, differentiable=True)
        opt.state[p]["step"] = torch.tensor(1.0, dtype=torch.float64)
        opt.state[p]["exp_avg"] = exp_avg.clone()
        opt.state[p]["exp_avg_sq"] = exp_avg_sq.clone()
        opt.set_masks({p: torch.tensor([[True, False, True], [True, True, False]])})
        opt.step()
        return p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]
    args.append(torch.rand(2, 3, dtype=torch.float64, generator=g).add_(0.1).requires_grad_())
    out = step(*args)[0]
    assert out.requires_grad and out.grad_fn is not None
    assert bool((out.detach()[:, [1, 2]].flatten()[[0, 3]] == 0).all())
    assert torch.autograd.gradcheck(step, args)


def test_fused_honours_the_grad_scaler_protocol(cpu_backend):
    check_fused_grad_scaler_protocol(MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2), lambda: make_params(torch.float32), set_grads)


def test_prune_scope_arguments_and_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 4))
    opt = MaskedAdamW(model.parameters(), lr=1e-2)
    masks = opt.prune(0.5, model=model, exclude=[r"^3"])  # embeddings and norms out by default
    assert set(masks) == {model[1].weight}
    assert int((model[1].weight == 0).sum()) == 64 and int((model[3].weight == 0).sum()) == 0
    lin, head = torch.nn.Linear(20, 10), torch.nn.Linear(10, 3)
    opt = MaskedAdamW([{"params": lin.parameters()}, {"params": head.parameters(), "prune": False}], lr=1e-2)
    assert set(opt.prune(0.5)) == {lin.weight}
    adamw_keys = set(torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))]).param_groups[0])
    assert set(opt.param_groups[0]) == adamw_keys and set(opt.param_groups[1]) == adamw_keys | {"prune"}
    opt.clear_masks()
    assert opt.masks == {}


# ------------------------------------------------ optim_db's configs and errors
OPTIM_DB_IMPLS = [{}, {"foreach": True}, {"fused": True}]  # optim_db's own flags


def make_optim_db_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype))
            for s in ((33, 70), (17,), (8, 3, 3, 3))]


def set_optim_db_grads(params, step, keeps=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if keeps is not None and keeps[i] is not None:
            grad = torch.where(keeps[i], grad, torch.zeros_like(grad))
        p.grad = grad


@pytest.mark.parametrize("impl", OPTIM_DB_IMPLS, ids=impl_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_torch_config_is_bit_identical_without_masks(dtype, config, impl):
    ours, theirs = make_optim_db_params(dtype), make_optim_db_params(dtype)
    a = MaskedAdamW(ours, **fresh_kwargs(config.kwargs), **impl)
    b = torch.optim.AdamW(theirs, **fresh_kwargs(config.kwargs), **impl)
    for step in range(3):
        set_optim_db_grads(ours, step)
        set_optim_db_grads(theirs, step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())


@pytest.mark.parametrize("impl", OPTIM_DB_IMPLS, ids=impl_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
def test_with_masks_kept_weights_are_adamw_on_masked_gradients(config, impl):
    ours, theirs = make_optim_db_params(torch.float32), make_optim_db_params(torch.float32)
    opt, _, keeps = step_masked_beside_torch(MaskedAdamW, torch.optim.AdamW, {**config.kwargs, **impl}, ours,
                                             theirs, set_optim_db_grads)
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach(), q.detach())
    assert_pruned_exactly_zero(opt, ours, keeps)


@pytest.mark.parametrize("error", ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_every_torch_error_input_raises_the_same(error):
    check_error_input(MaskedAdamW, error, common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR)


def test_state_dicts_load_both_ways_and_masks_load_weights_only():
    ours, theirs = make_optim_db_params(torch.float32), make_optim_db_params(torch.float32)
    a = MaskedAdamW(ours, lr=1e-2)
    a.prune(0.5)
    set_optim_db_grads(ours, 0)
    a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = torch.optim.AdamW(theirs, lr=1e-2)
    b.load_state_dict(state)  # AdamW keeps our per-parameter "mask" words as state it never reads
    c = MaskedAdamW(make_optim_db_params(torch.float32), lr=1e-2)
    c.load_state_dict(state)
    assert len(c.masks) == 2 and set(c.param_groups[0]) == set(b.param_groups[0])


def test_a_grad_scaler_skipped_step_changes_nothing():
    params = make_optim_db_params(torch.float32)
    opt = MaskedAdamW(params, lr=1e-2, fused=True)
    opt.prune(0.5)
    set_optim_db_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    set_optim_db_grads(params, 1)
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
    assert opt.param_groups[0]["lr"] == 1e-2 and dsd.lr_scale == pytest.approx(0.1)  # re-dense steps at 1e-3
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(z < e for z, e in zip(zeros[2], zeros[1]))  # pruned weights train again


@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"foreach": False}, {"fused": True}],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("cls,torch_cls,kwargs", [
    (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (__import__("dsd_kernels").optim.MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
], ids=["MaskedAdamW", "MaskedSGD"])
def test_a_parameter_listed_twice_steps_as_torch_steps_it(cpu_backend, cls, torch_cls, kwargs, impl):
    """torch warns and steps it once per listing (list-wise under foreach): the same bits, masked too."""
    torch.manual_seed(0)
    theirs, other = torch.nn.Parameter(torch.randn(5, 40)), torch.nn.Parameter(torch.randn(3))
    keep = torch.rand(5, 40) > 0.5
    with torch.no_grad():
        theirs.mul_(keep)
    ours, ours_other = torch.nn.Parameter(theirs.detach().clone()), torch.nn.Parameter(other.detach().clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt_theirs = torch_cls([theirs, theirs, other], **kwargs, **impl)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt_ours = cls([ours, ours, ours_other], **kwargs, **impl)
    opt_ours.set_masks({ours: keep})
    for _ in range(3):
        grad, grad_other = torch.randn(5, 40), torch.randn(3)
        theirs.grad, ours.grad = grad * keep, grad.clone()
        other.grad, ours_other.grad = grad_other.clone(), grad_other.clone()
        opt_theirs.step()
        opt_ours.step()
    assert torch.equal(ours.detach(), theirs.detach()) and torch.equal(ours_other.detach(), other.detach())
