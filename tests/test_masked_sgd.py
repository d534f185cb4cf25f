"""masked_sgd_ and MaskedSGD against torch.optim.SGD and reference/, on every backend present."""
import io
import itertools

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import ops
from dsd_kernels import reference as R
from dsd_kernels.optim import MaskedSGD, masked_sgd

from .conftest import DEVICE

OPTIONS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
           for m, d, wd, n, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [0.0, 1e-2],
                                                    [False, True], [False, True])
           if not (n and (m == 0 or d != 0))]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(33, 70), (17,), (4, 3, 3, 3), (1,), (64, 96), (64,)]  # the last two: rows of whole mask words
    return [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]


def make_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype).to(DEVICE) for p in params]


def make_keeps(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=g) > 0.5).to(DEVICE) if p.dim() >= 2 else None
            for p in params]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_without_masks_matches_torch_sgd(backend, opts):
    ours = [torch.nn.Parameter(p) for p in make_params()]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt_ours = MaskedSGD(ours, lr=0.05, **opts)
    opt_theirs = torch.optim.SGD(theirs, lr=0.05, **opts)
    for step in range(5):
        for p, q, g in zip(ours, theirs, make_grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        if opts["momentum"]:
            torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"],
                                       opt_theirs.state[q]["momentum_buffer"], **TOL[torch.float32])


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_with_masks_matches_sgd_on_masked_grads_then_zeroing(backend, opts):
    ours = [torch.nn.Parameter(p) for p in make_params()]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    keeps = make_keeps(ours)
    opt_ours = MaskedSGD(ours, lr=0.05, **opts)
    opt_ours.set_masks({p: k for p, k in zip(ours, keeps) if k is not None})
    opt_theirs = torch.optim.SGD(theirs, lr=0.05, **opts)
    with torch.no_grad():
        for q, k in zip(theirs, keeps):
            if k is not None:
                q.mul_(k)
    for step in range(5):
        for p, q, g, k in zip(ours, theirs, make_grads(ours, step), keeps):
            p.grad = g.clone()
            q.grad = g * k if k is not None else g.clone()
        opt_ours.step()
        opt_theirs.step()
        with torch.no_grad():
            for q, k in zip(theirs, keeps):
                if k is not None:
                    q.mul_(k)
                    if opts["momentum"]:
                        opt_theirs.state[q]["momentum_buffer"].mul_(k)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_fused_matches_reference_every_dtype(backend, dtype):
    params = make_params(dtype)
    ref_params = [p.clone() for p in params]
    keeps = make_keeps(params)
    masks = [dk.Mask.from_bool(k) if k is not None else None for k in keeps]
    for p, q, k in zip(params, ref_params, keeps):
        if k is not None:
            p.masked_fill_(~k, 0)
            q.masked_fill_(~k, 0)
    bufs, ref_bufs = [None] * len(params), [None] * len(params)
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False)
    for step in range(4):
        grads = make_grads(params, step)
        ops.masked_sgd_(params, grads, bufs, masks, **hyper)
        R.masked_sgd_(ref_params, grads, ref_bufs, keeps, **hyper)
    for p, q, b, rb in zip(params, ref_params, bufs, ref_bufs):
        torch.testing.assert_close(p, q, **TOL[dtype])
        torch.testing.assert_close(b, rb, **TOL[dtype])


def test_pruned_weights_and_momentum_stay_exactly_zero(backend):
    params = [torch.nn.Parameter(p) for p in make_params()]
    opt = MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt.prune(0.6)
    pruned = {p: ~m.to_bool() for p, m in opt.masks.items()}
    for step in range(30):
        for p, g in zip(params, make_grads(params, step)):
            if p in pruned:  # NaN/inf gradients at pruned positions must not leak into them
                g = torch.where(pruned[p] & (g > 0), float("nan"), g)
                g = torch.where(pruned[p] & (g < 0), float("inf"), g)
            p.grad = g
        opt.step()
    for p, where in pruned.items():
        assert p[where].eq(0).all()
        assert opt.state[p]["momentum_buffer"][where].eq(0).all()
        assert int(where.sum()) == round(0.6 * p.numel())
        assert torch.isfinite(p).all()


def test_clear_masks_lets_pruned_weights_move_from_zero(backend):
    p = torch.nn.Parameter(torch.randn(8, 8, device=DEVICE))
    opt = MaskedSGD([p], lr=0.1, momentum=0.9)
    opt.prune(0.5)
    pruned = ~opt.masks[p].to_bool()
    p.grad = torch.ones_like(p)
    opt.step()
    assert p[pruned].eq(0).all()
    opt.clear_masks()
    assert opt.masks == {}
    opt.step()
    assert torch.allclose(p[pruned], torch.full_like(p[pruned], -0.1))


def test_prune_skips_groups_with_prune_false_and_1d_params():
    lin, head = torch.nn.Linear(20, 10), torch.nn.Linear(10, 3)
    opt = MaskedSGD([{"params": lin.parameters()}, {"params": head.parameters(), "prune": False}], lr=0.1)
    masks = opt.prune(0.5)
    assert set(masks) == {lin.weight}
    assert int((lin.weight == 0).sum()) == 100 and int((head.weight == 0).sum()) == 0
    extra = torch.nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [extra]})
    assert any(p is extra for p in opt.prunable_params())  # unless its group says prune=False
    # groups carry exactly SGD's keys (prune only where the user set it)
    sgd_keys = set(torch.optim.SGD([torch.nn.Parameter(torch.randn(2))]).param_groups[0])
    assert set(opt.param_groups[-1]) == sgd_keys and set(opt.param_groups[0]) == sgd_keys


def test_state_dict_round_trip_and_bit_identical_resume(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    data = [(torch.randn(8, 12), torch.randn(8, 4)) for _ in range(10)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(model, opt, data[:3])
    opt.prune(0.5)
    train(model, opt, data[3:5])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    train(model, opt, data[5:])
    final = [p.detach().clone() for p in model.parameters()]

    ckpt = torch.load(path, weights_only=True)
    model2 = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model2.load_state_dict(ckpt["model"])
    opt2 = MaskedSGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    assert [m.shape for m in opt2.masks.values()] == [torch.Size([16, 12]), torch.Size([4, 16])]
    train(model2, opt2, data[5:])
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_and_tensor_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = MaskedSGD([p], lr=torch.tensor(1.0))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert torch.allclose(p, torch.full((3,), -1.75))


@pytest.mark.parametrize("fused", [False, True])
def test_tensor_lr_takes_sgds_own_step_then_one_remasking(fused):
    # a tensor lr is read by SGD's own step (on a GPU without a host sync), then the pruned
    # weights and momentum go back to exactly 0: the same bits as SGD on the masked gradients
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(8, 12, generator=g), torch.randn(12, generator=g)]
    keep = torch.rand(8, 12, generator=g) > 0.5
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.masked_fill(~keep, 0) if v.dim() == 2 else v.clone()) for v in values]
    opt = MaskedSGD(ours, lr=torch.tensor(0.05), momentum=0.9, fused=fused)
    opt.set_masks({ours[0]: keep})
    ref = torch.optim.SGD(theirs, lr=torch.tensor(0.05), momentum=0.9, fused=fused)
    for step in range(3):
        grads = [torch.randn(v.shape, generator=g) for v in values]
        for p, q, gr in zip(ours, theirs, grads):
            p.grad = gr.clone()
            q.grad = gr.masked_fill(~keep, 0) if gr.dim() == 2 else gr.clone()  # +0, as ours
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        ref.step()
        opt.param_groups[0]["lr"].mul_(0.5)  # changed in place, as a CUDA-graph LR schedule does
        ref.param_groups[0]["lr"].mul_(0.5)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.detach().view(torch.int32), q.detach().view(torch.int32))
            assert torch.equal(opt.state[p]["momentum_buffer"].view(torch.int32),
                               ref.state[q]["momentum_buffer"].view(torch.int32))
    names = {e.name for e in prof.events()}
    assert ("aten::_fused_sgd_" in names) == fused
    assert not any(n.startswith("dsd_kernels::masked_sgd") or n.endswith("::masked_sgd_") for n in names)


def test_grad_scaler_skipped_step_changes_nothing():
    model = torch.nn.Linear(6, 4)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.prune(0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x = torch.randn(5, 6)
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0  # the overflow was seen and the step skipped
    for p, q, b in zip(model.parameters(), before, bufs):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum_buffer"], b)


def test_closure_zero_grad_and_step_hooks():
    model = torch.nn.Linear(3, 1)
    opt = MaskedSGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor) and calls == ["post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"), (dict(momentum=-0.5), "Invalid momentum value"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
])
def test_invalid_hyperparameters_raise_like_torch_sgd(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ValueError, match=match):
        MaskedSGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ValueError, match=match):
        masked_sgd([torch.zeros(1)], [torch.zeros(1)], [None], [None], **{"lr": 0.1, **kwargs})


def test_bad_masks_and_grads():
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))
    opt = MaskedSGD([a], lr=0.1)
    with pytest.raises(ValueError, match=r"mask of parameter 0 has shape \(5, 4\) but its parameter has shape \(4, 5\)"):
        opt.set_masks({a: torch.ones(5, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not hold"):
        opt.set_masks({b: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="a Mask, a bool tensor or a 0/1 float tensor, got a torch.int64"):
        opt.set_masks({a: torch.ones(4, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        opt.set_masks({a: torch.full((4, 5), 0.5)})
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        ops.masked_sgd_([torch.zeros(4)], [torch.zeros(4)], [None], [torch.ones(5, dtype=torch.bool)], lr=0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        ops.masked_sgd_([torch.zeros(4)], [], [None], [None], lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        ops.masked_sgd_([torch.zeros(4)], [torch.zeros(5)], [None], [None], lr=0.1)


def test_save_load_masks_weights_only():
    a = torch.nn.Parameter(torch.randn(6, 7))
    opt = MaskedSGD([a], lr=0.1, momentum=0.9)
    opt.prune(0.3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = MaskedSGD([a], lr=0.1, momentum=0.9)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.masks[a] == opt.masks[a]


def test_opcheck_masked_sgd():
    params = [torch.randn(5, 40), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    words = [dk.Mask.from_bool(torch.rand(5, 40) > 0.5).packed, None]
    torch.library.opcheck(torch.ops.dsd_kernels.masked_sgd_.default,
                          (params, grads, bufs, words, [False, True], 0.1, 0.9, 0.0, 1e-3, True, False))


def test_masks_none_means_all_dense_and_iterables_are_accepted(backend):
    params = make_params()
    theirs = [p.clone() for p in params]
    grads = make_grads(params, 0)
    ops.masked_sgd_(iter(params), (g for g in grads), None, None, lr=0.1)
    R.masked_sgd_(theirs, grads, [None] * len(theirs), [None] * len(theirs), lr=0.1, momentum=0.0,
                  dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_non_contiguous_mask_words_and_float_masks_work_on_every_backend(backend):
    from torch.nn.utils import prune
    layer = torch.nn.Linear(70, 33).to(DEVICE)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    w = layer.weight.detach().clone()
    keep = layer.weight_mask.bool()
    padded = torch.zeros(33, 6, dtype=torch.int32, device=DEVICE)
    padded[:, ::2] = dk.Mask.from_bool(keep).packed
    strided = dk.Mask(padded[:, ::2], keep.shape)  # built from a non-contiguous view
    grads = [torch.randn_like(w)]
    outs = []
    for mask in (strided, layer.weight_mask, keep):  # packed view, 0/1 float (torch prune), bool
        p = w.clone()
        ops.masked_sgd_([p], grads, [None], [mask], lr=0.1, momentum=0.9)
        outs.append(p)
    ref = [w.clone()]
    R.masked_sgd_(ref, grads, [None], [keep], lr=0.1, momentum=0.9, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False)
    for p in outs:
        torch.testing.assert_close(p, ref[0], **TOL[torch.float32])
        assert p[~keep].eq(0).all()


def _same_state(a: dict, b: dict) -> bool:
    flat = lambda s: {(i, k): v for i, e in s["state"].items() for k, v in e.items()}  # noqa: E731
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k] for k in fa) \
        and a["param_groups"] == b["param_groups"]


def test_masks_are_per_parameter_state_entries_and_the_previous_format_loads():
    a, bias = torch.nn.Parameter(torch.randn(6, 40)), torch.nn.Parameter(torch.randn(6))
    opt = MaskedSGD([a, bias], lr=0.1, momentum=0.9)
    opt.prune(0.3)
    state = opt.state_dict()
    assert "masks" not in state and "mask" not in state["state"].get(1, {})  # 1-D: no entry
    # the words' little-endian bytes (optim/mask_state.py): they survive a torch optimizer's cast
    assert state["state"][0]["mask"].dtype == torch.uint8
    assert torch.equal(state["state"][0]["mask"].view(torch.int32), opt.masks[a].packed)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other_a, other_bias = torch.nn.Parameter(torch.randn(6, 40)), torch.nn.Parameter(torch.randn(6))
    other = MaskedSGD([other_a, other_bias], lr=0.5)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.masks[other_a] == opt.masks[a] and "mask" not in other.state[other_a]
    fresh = MaskedSGD([torch.nn.Parameter(torch.randn(6, 40))], lr=0.1).state_dict()
    assert bool((fresh["state"][0]["mask"][:, 0] == 255).all())  # every weight kept: no mask
    # the format before per-parameter entries: a top-level {"masks": {index: Mask state}}
    previous = {"state": {}, "param_groups": state["param_groups"], "masks": {0: opt.masks[a].state_dict()}}
    old_loader = MaskedSGD([torch.nn.Parameter(torch.randn(6, 40)), torch.nn.Parameter(torch.randn(6))], lr=0.5)
    old_loader.load_state_dict(previous)
    assert list(old_loader.masks.values()) == [opt.masks[a]]
    cleared = MaskedSGD([a, bias], lr=0.1)
    cleared.load_state_dict({"state": {0: {"mask": fresh["state"][0]["mask"]}}, "param_groups": state["param_groups"]})
    assert cleared.masks == {}


def test_load_state_dict_with_a_bad_mask_changes_nothing():
    a = torch.nn.Parameter(torch.randn(6, 7))
    opt = MaskedSGD([a], lr=0.1, momentum=0.9)
    opt.prune(0.3)
    state = opt.state_dict()
    other = MaskedSGD([torch.nn.Parameter(torch.randn(6, 7))], lr=0.5)
    before = other.state_dict()
    previous = {"state": {}, "param_groups": state["param_groups"]}
    for bad in (5, -1, "0"):  # the previous format's index
        broken = {**previous, "masks": {bad: opt.masks[a].state_dict()}}
        with pytest.raises(ValueError, match=f"mask for parameter {bad!r}, but this optimizer holds "
                                             r"parameters 0\.\.0"):
            other.load_state_dict(broken)
        assert _same_state(other.state_dict(), before) and other.masks == {}
    for words, match in ((torch.zeros(6, 2, dtype=torch.int32), r"int32 \(6, 2\); parameter 0 \(\(6, 7\) here\) "
                                                                   r"needs bytes of shape \(6, 4\) .* or int32 "
                                                                   r"words of shape \(6, 1\)"),
                         (torch.zeros(6, 1, dtype=torch.int64), "torch.int64 \\(6, 1\\)"), ("words", "is str")):
        broken = {**state, "state": {0: {**state["state"][0], "mask": words}}}
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(broken)
        assert _same_state(other.state_dict(), before) and other.masks == {}


def test_direct_op_call_checks_its_inputs_like_the_wrapper():
    p, g = torch.zeros(4, 40), torch.zeros(4, 40)
    bad_words = torch.zeros(4, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"mask_words\[0\] \(\(4, 1\), torch.int64\) does not fit params\[0\]"):
        torch.ops.dsd_kernels.masked_sgd_([p], [g], [], [bad_words], [], 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match=r"grads\[0\] .* does not match params\[0\]"):
        torch.ops.dsd_kernels.masked_sgd_([p], [g[:2]], [], [None], [], 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="momentum_buffers and first_step need 1 entries"):
        torch.ops.dsd_kernels.masked_sgd_([p], [g], [], [None], [], 0.1, 0.9, 0.0, 0.0, False, False)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=r"mask_words\[0\]"):
        fp, fg = mode.from_tensor(p), mode.from_tensor(g)
        torch.ops.dsd_kernels.masked_sgd_([fp], [fg], [], [mode.from_tensor(bad_words)], [], 0.1,
                                          0.0, 0.0, 0.0, False, False)


@pytest.mark.parametrize("shape", [(130, 200), (70, 100), (256, 96)])
def test_words_that_keep_nothing_are_cleared_and_the_rest_stepped(backend, shape):
    """Pruned blocks are only cleared, never stepped: the weight and momentum there become exactly
    +0 whatever they held (NaN, inf, -0.0, 1.0); the kept entries match the reference bit for bit."""
    gen = torch.Generator().manual_seed(sum(shape))
    tiles = torch.rand(-(-shape[0] // 64), -(-shape[1] // 64), generator=gen) < 0.4
    keep = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:shape[0], :shape[1]]
    keep = keep & (torch.rand(shape, generator=gen) > 0.2)
    keep[1] = False
    junk = torch.tensor([float("nan"), float("inf"), -0.0, 1.0])

    def garbage(t):
        return torch.where(keep, t, junk[torch.randint(0, 4, shape, generator=gen)])
    p, buf, grad = garbage(torch.randn(shape, generator=gen)), garbage(torch.randn(shape, generator=gen)), \
        garbage(torch.randn(shape, generator=gen))
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    ours_p, ours_b = [p.clone().to(DEVICE)], [buf.clone().to(DEVICE)]
    with dk.use_backend(backend):
        ops.masked_sgd_(ours_p, [grad.clone().to(DEVICE)], ours_b, [dk.Mask.from_bool(keep.to(DEVICE))], **kwargs)
    want_p, want_b = [p.clone()], [buf.clone()]
    R.masked_sgd_(want_p, [grad.clone()], want_b, [keep], dampening=0.0, nesterov=False, maximize=False, **kwargs)
    for ours, want in ((ours_p[0].cpu(), want_p[0]), (ours_b[0].cpu(), want_b[0])):
        assert torch.equal(ours.view(torch.int32), want.view(torch.int32))
        assert ours.view(torch.int32)[~keep].eq(0).all()
