"""MaskedSGD as torch.optim.SGD, driven by the inputs PyTorch tests SGD with
(torch.testing._internal.common_optimizers.optim_db): every config and every error, bit for bit,
on every CPU backend; and every parameter SGD steps (channels_last, non-contiguous, complex,
sparse gradients), state_dict both ways, deepcopy, hooks, older state formats, differentiable
mode and the fused GradScaler protocol."""
import copy

import pytest
import torch

from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedSGD

from .conftest import DEVICE
from ._helpers.drop_in import (assert_pruned_exactly_zero, check_deepcopy_and_step_hooks, check_error_input,
                      check_fused_grad_scaler_protocol, check_layout_steps_in_place,
                      check_state_dict_loads_both_ways, fresh_kwargs, same_bits, step_masked_beside_torch)

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test inputs need expecttest")
SGD_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.SGD)
CONFIGS = SGD_INFO.optim_inputs_func(device="cpu", dtype=torch.float32)
IMPLS = [{}, {"foreach": False}, {"foreach": True}, {"fused": True}]

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="bitwise comparisons with torch's CPU SGD")


def make_params(dtype, seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 3, 3, 3, generator=g, dtype=dtype).contiguous(memory_format=memory_format)
    return [torch.nn.Parameter(t) for t in
            (torch.randn(33, 70, generator=g, dtype=dtype), torch.randn(17, generator=g, dtype=dtype),
             conv, torch.randn(1, generator=g, dtype=dtype), torch.randn(64, 96, generator=g, dtype=dtype),
             torch.randn(64, generator=g, dtype=dtype))]


def set_grads(params, step, masks=None):
    """Gradients drawn from a per-step seed, in each parameter's memory format."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if masks and masks[i] is not None:  # what torch.optim.SGD steps on in the comparison
            grad = torch.where(masks[i], grad, torch.zeros_like(grad))
        p.grad = torch.empty_like(p).copy_(grad)


def assert_same_bits(a, b, what):
    assert same_bits(a, b), f"{what}: the bits differ"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_torch_config_is_bit_identical_without_masks(cpu_backend, dtype, config, impl):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_ours = MaskedSGD(ours, **fresh_kwargs(config.kwargs), **impl)
    opt_theirs = torch.optim.SGD(theirs, **fresh_kwargs(config.kwargs), **impl)
    for step in range(4):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt_ours.step()
        opt_theirs.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_same_bits(p.detach(), q.detach(), f"param {i}")
        if "momentum_buffer" in opt_theirs.state[q] and opt_theirs.state[q]["momentum_buffer"] is not None:
            assert_same_bits(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"],
                             f"momentum buffer {i}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_torch_config_with_masks_is_sgd_on_masked_gradients(cpu_backend, dtype, config):
    """Kept weights: the bits of torch.optim.SGD stepping on grad * mask; pruned weights and
    momentum: exactly +0, whatever the gradient held there."""
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_ours, _, keeps = step_masked_beside_torch(MaskedSGD, torch.optim.SGD, config.kwargs, ours,
                                                  theirs, set_grads)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_same_bits(p.detach(), q.detach(), f"param {i}")
    assert_pruned_exactly_zero(opt_ours, ours, keeps)


@pytest.mark.parametrize("error", SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_every_torch_error_input_raises_the_same(error):
    check_error_input(MaskedSGD, error, common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
])
def test_flag_errors_are_sgds(kwargs, err, match):
    for cls in (torch.optim.SGD, MaskedSGD):
        with pytest.raises(err, match=match):
            cls([torch.nn.Parameter(torch.randn(3))], lr=0.1, **kwargs)


def test_fused_rejects_what_sgd_fused_rejects():
    for cls in (torch.optim.SGD, MaskedSGD):
        q = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        q.grad = torch.zeros_like(q)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point"):
            cls([q], lr=0.1, fused=True).step()


def test_state_dict_of_sgd_loads_here_and_back(cpu_backend):
    check_state_dict_loads_both_ways(MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
                                     lambda: make_params(torch.float32), set_grads)


def test_older_state_dict_formats_load():
    params = make_params(torch.float32)
    opt = MaskedSGD(params, lr=0.1, momentum=0.9)
    set_grads(params, 0)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:  # as saved before these flags existed
        for key in ("foreach", "differentiable", "fused", "maximize"):
            group.pop(key, None)
    for entry in state["state"].values():  # saved before masks were per-parameter entries
        entry.pop("mask", None)
    other = MaskedSGD(make_params(torch.float32), lr=0.1, momentum=0.9)
    other.load_state_dict(state)
    assert other.param_groups[0]["foreach"] is None and other.param_groups[0]["maximize"] is False


def test_deepcopy_and_step_hooks(cpu_backend):
    check_deepcopy_and_step_hooks(MaskedSGD, dict(lr=0.1, momentum=0.9), lambda: make_params(torch.float32), set_grads)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_channels_last_and_non_contiguous_params_step_in_place(cpu_backend, layout):
    check_layout_steps_in_place(MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), layout)


@pytest.mark.parametrize("impl", IMPLS[:3], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("config", SGD_INFO.optim_inputs_func(device="cpu", dtype=torch.complex64), ids=lambda c: c.desc)
def test_complex_params_are_bit_identical_to_sgd(cpu_backend, config, impl):
    """complex64: torch's own arithmetic (complex products rounded apart), masked or not."""
    kwargs = {**fresh_kwargs(config.kwargs), **impl}
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 7, dtype=torch.complex64, generator=g)
    ours_param, their_param = torch.nn.Parameter(z.clone()), torch.nn.Parameter(z.clone())
    plain_ours, plain_theirs = torch.nn.Parameter(z[0].clone()), torch.nn.Parameter(z[0].clone())
    keep = torch.rand(6, 7, generator=g) > 0.5
    ours = MaskedSGD([ours_param, plain_ours], **kwargs)
    ours.set_masks({ours_param: keep})  # one bit per complex element
    theirs = torch.optim.SGD([their_param, plain_theirs], **kwargs)
    with torch.no_grad():
        their_param.masked_fill_(~keep, 0)
    for step in range(3):
        grad, plain = torch.randn(6, 7, dtype=torch.complex64, generator=g), torch.randn(7, dtype=torch.complex64,
                                                                                            generator=g)
        ours_param.grad, plain_ours.grad = grad.clone(), plain.clone()
        their_param.grad, plain_theirs.grad = torch.where(keep, grad, torch.zeros_like(grad)), plain.clone()
        ours.step()
        theirs.step()
    assert_same_bits(torch.view_as_real(ours_param.detach()), torch.view_as_real(their_param.detach()), "masked")
    assert_same_bits(torch.view_as_real(plain_ours.detach()), torch.view_as_real(plain_theirs.detach()), "plain")
    assert bool((ours_param.detach()[~keep] == 0).all())


@pytest.mark.parametrize("kwargs", [dict(lr=0.5), dict(lr=0.5, momentum=0.9), dict(lr=0.5, momentum=0.9, nesterov=True),
                                    dict(lr=0.5, maximize=True), dict(lr=0.5, momentum=0.9, dampening=0.5)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sparse_gradients_are_bit_identical_to_sgd(cpu_backend, kwargs):
    """An embedding's uncoalesced sparse gradient, added as torch adds it (entry by entry)."""
    torch.manual_seed(0)
    emb_ours = torch.nn.Embedding(20, 6, sparse=True)
    emb_theirs = copy.deepcopy(emb_ours)
    ours, theirs = MaskedSGD(emb_ours.parameters(), **kwargs), torch.optim.SGD(emb_theirs.parameters(), **kwargs)
    for step in range(3):
        idx = torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(step))  # repeated rows
        for emb, opt in ((emb_ours, ours), (emb_theirs, theirs)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            opt.step()
    assert_same_bits(emb_ours.weight.detach(), emb_theirs.weight.detach(), "embedding")


def test_sparse_gradients_of_an_embedding(cpu_backend):
    torch.manual_seed(0)
    emb_ours = torch.nn.Embedding(20, 6, sparse=True)
    emb_theirs = copy.deepcopy(emb_ours)
    keep = torch.rand(20, 6) > 0.5
    ours = MaskedSGD(emb_ours.parameters(), lr=0.5, momentum=0.9)
    ours.set_masks({emb_ours.weight: keep})
    theirs = torch.optim.SGD(emb_theirs.parameters(), lr=0.5, momentum=0.9)
    with torch.no_grad():
        emb_theirs.weight.mul_(keep)
    for step in range(3):
        idx = torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(step))
        for emb, opt in ((emb_ours, ours), (emb_theirs, theirs)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            if opt is theirs:
                emb.weight.grad = (emb.weight.grad.to_dense() * keep).to_sparse()
            opt.step()
    # the reference's masked gradient is coalesced (to_sparse), ours is added entry by entry
    torch.testing.assert_close(emb_ours.weight, emb_theirs.weight, rtol=0, atol=1e-6)
    assert bool((emb_ours.weight.detach()[~keep] == 0).all())
    buf = ours.state[emb_ours.weight]["momentum_buffer"]  # sparse, as torch keeps it, pruned entries 0
    assert bool((buf.to_dense()[~keep] == 0).all())


def test_differentiable_mode_is_traced_by_autograd():
    def step(param, grad, buf):
        p = param.clone()  # a non-leaf, as torch's own differentiable tests use
        p.grad = grad
        opt = MaskedSGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, differentiable=True)
        opt.state[p]["momentum_buffer"] = buf.clone()
        opt.set_masks({p: torch.tensor([[True, False, True], [True, True, False]])})
        opt.step()
        return p, opt.state[p]["momentum_buffer"]

    args = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out, _ = step(*args)
    assert out.requires_grad and out.grad_fn is not None
    assert torch.autograd.gradcheck(step, args)


def test_fused_honours_the_grad_scaler_protocol(cpu_backend):
    check_fused_grad_scaler_protocol(MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), lambda: make_params(torch.float32), set_grads)


def test_channels_last_resnet_trains_through_dense_sparse_redense():
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
            self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    model = model.to(memory_format=torch.channels_last)
    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True)
    dsd = DSDScheduler(opt, dense_epochs=1, sparse_epochs=2, redense_epochs=1, sparsity=0.5)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (16,))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    losses, zeros = [], []
    for epoch in range(dsd.total_epochs):
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        zeros.append([int((w == 0).sum()) for w in convs])
        dsd.step()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    exact = [round(0.5 * w.numel()) for w in convs]
    assert zeros[1] == exact and zeros[2] == exact  # sparse phase: exactly half of every conv
    assert all(z < e for z, e in zip(zeros[3], exact))  # re-dense: pruned weights train again
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_bit_identical_to_sgds_default_step(cpu_backend, dtype, config):
    """fp16/bf16: the bits of torch.optim.SGD's default CPU step (single-tensor), which rounds
    each op to the dtype (with masks, on the masked gradients)."""
    kwargs = {k: v for k, v in fresh_kwargs(config.kwargs).items() if k not in ("foreach", "fused")}
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_ours = MaskedSGD(ours, **kwargs)
    opt_theirs = torch.optim.SGD(theirs, foreach=False, **kwargs)
    keep = torch.rand(33, 70, generator=torch.Generator().manual_seed(3)) > 0.5
    opt_ours.set_masks({ours[0]: keep})
    with torch.no_grad():
        theirs[0].masked_fill_(~keep, 0)
    for step in range(4):
        set_grads(ours, step)
        set_grads(theirs, step, masks=[keep] + [None] * (len(theirs) - 1))
        opt_ours.step()
        opt_theirs.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_same_bits(p.detach(), q.detach(), f"param {i}")
