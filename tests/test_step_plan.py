"""Step plans (dsd_kernels/ops/_plan.py): in the steady state MaskedSGD, MaskedAdamW and
OptimizerMasks step with one backend call per device, and the result is bit for bit the general
front end's; everything a plan depends on drops or refreshes it (masks set or cleared, a
parameter's storage swapped, a state tensor replaced, a mask changed in place, load_state_dict,
add_param_group, the backend choice), so a stale plan never steps the wrong memory."""
import copy

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.optim import MaskedAdamW, MaskedSGD, OptimizerMasks

from .conftest import DEVICE

SHAPES = [(12, 40), (40,), (6, 3, 3, 3), (33, 64), (5,)]


def make_params(seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES:
        t = torch.randn(s, generator=g).to(DEVICE)
        if channels_last and len(s) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


def keeps_for(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {i: (torch.rand(p.shape, generator=g) > 0.5).to(DEVICE) for i, p in enumerate(params) if p.dim() >= 2}


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE).contiguous(
            memory_format=torch.channels_last if p.dim() == 4 and p.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format)


def general_only(opt):
    """The same optimizer without plans: every step through the general front end."""
    opt._group_plan = lambda *args, **kwargs: None
    return opt


def bits(t):
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def assert_same(a_params, b_params, a_opt, b_opt):
    for p, q in zip(a_params, b_params):
        assert torch.equal(bits(p), bits(q))
        for key, value in a_opt.state[p].items():
            assert torch.equal(bits(value), bits(b_opt.state[q][key])), key


OPTIMIZERS = {
    "sgd": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "sgd-fused": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, fused=True),
    "sgd-no-momentum": lambda ps: MaskedSGD(ps, lr=0.05),
    "adamw": lambda ps: MaskedAdamW(ps, lr=1e-2),
    "adamw-amsgrad": lambda ps: MaskedAdamW(ps, lr=1e-2, amsgrad=True, maximize=True),
    "adamw-fused": lambda ps: MaskedAdamW(ps, lr=1e-2, fused=True),
}


def pair(name, backend):
    """(ours, general): the same optimizer twice, masks set alike; the second never plans."""
    out = []
    for planned in (True, False):
        params = make_params()
        opt = OPTIMIZERS[name](params)
        if not planned:
            general_only(opt)
        opt.set_masks({params[i]: k for i, k in keeps_for(params).items()})
        out.append((params, opt))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_planned_steps_are_the_general_steps_bit_for_bit(name, cpu_backend):
    (a, opt_a), (b, opt_b) = pair(name, cpu_backend)
    for step in range(4):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
        assert_same(a, b, opt_a, opt_b)
    assert opt_a.__dict__["_step_plans"], "the steady state took no plan"


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("name", ["sgd-fused", "sgd"])
def test_planned_sgd_over_mixed_dtypes_is_the_general_step(name, dtypes, cpu_backend):
    # several dtypes in one group: the kept per-plan calls (one per dtype, the fp16/bf16 split)
    # must step each tensor as the general path does
    (a, opt_a), (b, opt_b) = pair(name, cpu_backend)
    for params in (a, b):
        for i, p in enumerate(params):
            p.data = p.data.to(dtypes[i % 2])
    for step in range(4):
        for params in (a, b):
            g = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype).contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            for x, y in ((p, q), (opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])):
                assert torch.equal(x.detach().contiguous().view(torch.uint8), y.detach().contiguous().view(torch.uint8))
    assert opt_a.__dict__["_step_plans"], "the steady state took no plan"


@pytest.mark.skipif(DEVICE != "cpu" or "cpp" not in dk.available_backends(), reason="the C++ kernels on CPU")
@pytest.mark.parametrize("name,kernel", [("sgd", "dsd_kernels_cpp::masked_sgd_"),
                                         ("adamw", "dsd_kernels_cpp::masked_adamw_")])
def test_a_steady_step_is_one_kernel_call_and_no_custom_op_dispatch(name, kernel):
    from torch.profiler import ProfilerActivity, profile
    params = make_params(channels_last=False)
    opt = OPTIMIZERS[name](params)
    opt.set_masks({params[i]: k for i, k in keeps_for(params).items()})
    for step in range(2):
        set_grads(params, step)
        opt.step()
    set_grads(params, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count(kernel) == 1
    assert not [n for n in names if n.startswith("dsd_kernels::")]  # the custom op is not dispatched


def test_everything_a_plan_depends_on_refreshes_it(cpu_backend):
    (a, opt_a), (b, opt_b) = pair("sgd", cpu_backend)

    def step_both(step):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
        assert_same(a, b, opt_a, opt_b)

    step_both(0)
    step_both(1)
    # a parameter's storage swapped: the plan must step the new storage
    fresh = torch.randn(a[0].shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    a[0].data = fresh.clone()
    b[0].data = fresh.clone()
    step_both(2)
    # a state tensor replaced: the new one is stepped, the old one left alone
    old = opt_a.state[a[3]]["momentum_buffer"]
    kept = old.clone()
    opt_a.state[a[3]]["momentum_buffer"] = old.clone()
    opt_b.state[b[3]]["momentum_buffer"] = opt_b.state[b[3]]["momentum_buffer"].clone()
    step_both(3)
    assert torch.equal(bits(old), bits(kept))
    # a mask changed in place (the channels_last weight's mask is derived: permuted once per version)
    for p, opt in ((a[2], opt_a), (b[2], opt_b)):
        opt._masks[p].packed.zero_()  # prune everything
    step_both(4)
    assert bool((a[2] == 0).all())
    # masks cleared and set, a param group added, a state dict loaded, the backend changed
    for opt in (opt_a, opt_b):
        opt.clear_masks()
    step_both(5)
    extra_a, extra_b = (torch.nn.Parameter(torch.ones(7, 9, device=DEVICE)) for _ in range(2))
    opt_a.add_param_group({"params": [extra_a]})
    opt_b.add_param_group({"params": [extra_b]})
    a.append(extra_a)
    b.append(extra_b)
    step_both(6)
    opt_a.set_masks({a[0]: keeps_for(a, seed=5)[0]})
    opt_b.set_masks({b[0]: keeps_for(b, seed=5)[0]})
    step_both(7)
    state = opt_b.state_dict()
    opt_a.load_state_dict(copy.deepcopy(state))  # each its own tensors: loading may keep them
    opt_b.load_state_dict(copy.deepcopy(state))
    step_both(8)
    other = "torch" if cpu_backend != "torch" else ("cpp" if "cpp" in dk.available_backends() else "torch")
    with dk.use_backend(other):
        step_both(9)


def test_a_missing_or_sparse_gradient_takes_the_general_path():
    params = make_params()
    opt = MaskedSGD(params, lr=0.1, momentum=0.9)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    before = params[1].detach().clone()
    params[1].grad = None  # SGD skips a parameter without a gradient
    set_grads(params[:1], 5)
    opt.step()
    assert torch.equal(params[1].detach(), before)
    emb = torch.nn.Embedding(10, 4, sparse=True).to(DEVICE)
    opt = MaskedSGD(emb.parameters(), lr=0.1)
    for _ in range(3):
        emb(torch.tensor([1, 2], device=DEVICE)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert emb.weight.grad is None


@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
@pytest.mark.parametrize("one_pass", [False, True])
def test_optimizer_masks_planned_is_general_bit_for_bit(optimizer, one_pass):
    """Planned two passes (or the planned one pass) against two passes through the front end."""
    results = []
    for planned in (True, False):
        params = make_params()
        opt = getattr(torch.optim, optimizer)(params, lr=0.01, **({"momentum": 0.9} if optimizer == "SGD" else {}))
        masks = OptimizerMasks(opt, elementwise=None if planned and one_pass else False)
        if not planned:
            masks._planned = lambda: None
        masks.set_masks({params[i]: k for i, k in keeps_for(params).items()})
        for step in range(3):
            set_grads(params, step)
            opt.step()
        masks.clear_masks()
        masks.set_masks({params[0]: keeps_for(params, seed=9)[0]})
        set_grads(params, 7)
        opt.step()
        results.append([bits(p) for p in params])
        if planned and one_pass:
            assert masks.one_pass_state is not None and masks._remask_cache["remask"][0]
        elif planned:
            assert masks._plans is not None
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_a_deep_copy_steps_its_own_tensors():
    params = make_params()
    opt = MaskedSGD(params, lr=0.1, momentum=0.9)
    opt.set_masks({params[i]: k for i, k in keeps_for(params).items()})
    for step in range(2):
        set_grads(params, step)
        opt.step()
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    before = [p.detach().clone() for p in params]
    for step in range(2, 4):
        set_grads(twin_params, step)
        twin.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))  # the original untouched


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("name", ["sgd", "adamw-amsgrad"])
def test_planned_triton_steps_keep_their_tables_and_stay_exact(name):
    # the Triton launchers keep a plan's tables (backends/triton/_tiles.planned_tables): new
    # gradients at new addresses every step must still be the ones read
    from dsd_kernels.backends.triton._tiles import _PLANNED
    with dk.use_backend("triton"):
        (a, opt_a), (b, opt_b) = pair(name, "triton")
        for step in range(3):
            set_grads(a, step)
            set_grads(b, step)
            opt_a.step()
            opt_b.step()
            assert_same(a, b, opt_a, opt_b)
        plan = next(entry[3] for entry in opt_a.__dict__["_step_plans"].values())
        assert plan in _PLANNED


@pytest.mark.parametrize("flags", [{"capturable": False, "differentiable": False, "lr": torch.tensor(0.01)},
                                   {"fused": True}])
def test_adamw_own_steps_are_remasked_by_a_plan_bit_for_bit(flags):
    # tensor lr (and fused=True on CUDA or under a GradScaler) take AdamW's own step and then one
    # re-masking pass over the weights and moments: planned, it equals the general pass
    runs = []
    for planned in (True, False):
        params = make_params()
        opt = MaskedAdamW(params, **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in flags.items()})
        if not planned:
            opt._remask_plans = lambda: None
        opt.set_masks({params[i]: k for i, k in keeps_for(params).items()})
        if flags.get("fused"):
            opt._op_arithmetic = lambda group: None  # AdamW's own step, as on CUDA
        for step in range(3):
            set_grads(params, step)
            opt.step()
        if planned:
            assert opt.__dict__["_step_plans"]["remask"][0]
        runs.append((params, opt))
    assert_same(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


@pytest.mark.parametrize("cls,hyper", [(MaskedSGD, dict(lr=0.1, momentum=0.9)), (MaskedAdamW, dict(lr=1e-2))],
                         ids=["MaskedSGD", "MaskedAdamW"])
def test_a_compiled_training_step_trains_like_the_eager_one(cls, hyper):
    # under torch.compile the step takes the general front end (the custom ops trace); the
    # compiled forward and backward round otherwise than eager, hence a tolerance, but pruned
    # weights stay exactly 0
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        opt = cls(model.parameters(), **hyper)
        masks = opt.prune(0.5)
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

        def step():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step) if compiled else step
        for _ in range(3):
            fn()
        for p, m in masks.items():
            assert bool((p[~m.to_bool()] == 0).all())
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masks_a_plan_cannot_serve_are_decided_once_and_still_applied():
    # complex parameters need the general front end: OptimizerMasks keeps that decision (no
    # rebuilt views every step) and the pruned entries are zeroed all the same
    w = torch.nn.Parameter(torch.randn(6, 8, dtype=torch.complex64, device=DEVICE))
    for one_pass in (False, None):
        opt = torch.optim.SGD([w], lr=0.1)
        masks = OptimizerMasks(opt, elementwise=one_pass)
        keep = (torch.rand(6, 8) > 0.5).to(DEVICE)
        masks.set_masks({w: keep})
        for _ in range(2):
            w.grad = torch.randn_like(w)
            opt.step()
            if one_pass is False:
                assert masks._plans == []
            else:
                assert masks._remask_cache["remask"][0] is None  # the general front end, decided once
            assert bool((w.detach()[~keep] == 0).all())
