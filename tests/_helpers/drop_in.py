"""Shared checks of our drop-in optimizers against torch's originals, over optim_db's inputs."""
import copy

import pytest
import torch


def fresh_kwargs(kwargs: dict) -> dict:
    """optim_db's kwargs with tensor values (tensor lr) cloned: optimizers own them."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def step_masked_beside_torch(ours_cls, torch_cls, kwargs: dict, ours: list, theirs: list, set_grads,
                             steps: int = 4):
    """Step `ours_cls` with masks on `ours` (NaN gradients where pruned) and `torch_cls` on
    `theirs` (the same values, pruned entries set to +0, gradients masked with +0): returns
    (our optimizer, their optimizer, keeps). set_grads(params, step, keeps=None) draws the
    gradients of one step."""
    g = torch.Generator().manual_seed(7)
    keeps = [torch.rand(p.shape, generator=g) > 0.4 if p.dim() >= 2 else None for p in ours]
    opt_ours = ours_cls(ours, **fresh_kwargs(kwargs))
    opt_ours.set_masks({p: k for p, k in zip(ours, keeps) if k is not None})
    opt_theirs = torch_cls(theirs, **fresh_kwargs(kwargs))
    with torch.no_grad():
        for q, k in zip(theirs, keeps):
            if k is not None:
                q.masked_fill_(~k, 0)
    for step in range(steps):
        set_grads(ours, step)
        for p, k in zip(ours, keeps):  # NaN where pruned: must never reach the weights or state
            if k is not None:
                p.grad[~k] = float("nan")
        set_grads(theirs, step, keeps)
        opt_ours.step()
        opt_theirs.step()
    return opt_ours, opt_theirs, keeps


def assert_pruned_exactly_zero(opt, params, keeps) -> None:
    """Pruned weights and every state tensor of their shape are exactly +0."""
    for p, k in zip(params, keeps):
        if k is None:
            continue
        for t in [p.detach()] + [v for v in opt.state[p].values()
                                 if isinstance(v, torch.Tensor) and v.shape == p.shape]:
            assert bool((t[~k] == 0).all()) and not bool(torch.signbit(t[~k]).any())


def check_error_input(cls, error, construction_error) -> None:
    """`cls` raises (or warns) as optim_db says the original does, at construction."""
    params, kwargs = error.optimizer_error_input.params, error.optimizer_error_input.kwargs
    assert error.error_on == construction_error
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            cls(params, **kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(params, **kwargs)


def assert_same_state(ours, theirs, ours_params, their_params, keeps=None) -> None:
    """The weights and every state tensor of the weight's shape (momentum, moments) carry the
    same bits in both optimizers; with keeps, on the kept entries only."""
    keeps = keeps or [None] * len(ours_params)
    for i, (p, q, k) in enumerate(zip(ours_params, their_params, keeps)):
        pairs = [(p.detach(), q.detach(), "param")] + [
            (ours.state[p][key], v, key) for key, v in theirs.state[q].items()
            if isinstance(v, torch.Tensor) and v.shape == q.shape]
        for a, b, what in pairs:
            assert same_bits(a if k is None else a[k], b if k is None else b[k]), f"{what} of param {i}: the bits differ"


def check_state_dict_loads_both_ways(ours_cls, torch_cls, kwargs: dict, make_params, set_grads) -> None:
    """torch_cls steps twice; its state_dict loads into ours_cls, whose state_dict loads back into
    torch_cls (our extra "masks" entry ignored); all three step on with the same bits."""
    a, b, c = make_params(), make_params(), make_params()
    original = torch_cls(a, **kwargs)
    for step in range(2):
        set_grads(a, step)
        original.step()
    with torch.no_grad():
        for x, y, z in zip(a, b, c):
            y.copy_(x)
            z.copy_(x)
    ours = ours_cls(b, **kwargs)
    ours.load_state_dict(copy.deepcopy(original.state_dict()))  # (state dicts share the tensors)
    back = torch_cls(c, **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert set(ours.param_groups[0]) == set(original.param_groups[0])
    for step in range(2, 4):
        for params, opt in ((a, original), (b, ours), (c, back)):
            set_grads(params, step)
            opt.step()
    assert_same_state(ours, original, b, a)
    assert_same_state(back, original, c, a)


def check_deepcopy_and_step_hooks(cls, kwargs: dict, make_params, set_grads) -> None:
    """A pruned optimizer and a twin loaded from its deepcopied state_dict step alike, hooks run
    around each step, and a deepcopy of the optimizer carries its masks to the copied params."""
    params = make_params()
    opt = cls(params, **kwargs)
    opt.prune(0.5)
    set_grads(params, 0)
    opt.step()
    twin_params = copy.deepcopy(params)
    twin = cls(twin_params, **kwargs)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    for step in range(1, 3):
        set_grads(params, step)
        set_grads(twin_params, step)
        opt.step()
        twin.step()
    assert calls == ["pre", "post"] * 2
    assert_same_state(twin, opt, twin_params, params)
    clone = copy.deepcopy(opt)
    cloned = [p for g in clone.param_groups for p in g["params"]]
    assert [clone.masks.get(p) for p in cloned] == [opt.masks.get(p) for p in params]
    assert all(c is not p for c, p in zip(cloned, params))


def check_layout_steps_in_place(ours_cls, torch_cls, kwargs: dict, layout: str) -> None:
    """A channels_last or strided ("sliced": a view with gaps) parameter, masked over its logical
    shape, steps in place (same storage, same strides) with the bits of torch_cls on a contiguous
    copy; its state keeps the parameter's memory format."""
    g = torch.Generator().manual_seed(3)
    if layout == "sliced":
        ours_param = torch.nn.Parameter(torch.randn(8, 6, 5, 10, generator=g)[:, :, :, ::2])
        weight = torch.nn.Parameter(ours_param.detach().clone())
        assert not ours_param.is_contiguous()
    else:
        weight = torch.nn.Parameter(torch.randn(8, 6, 5, 5, generator=g))
        ours_param = torch.nn.Parameter(weight.detach().clone().contiguous(memory_format=torch.channels_last))
    keep = torch.rand(weight.shape, generator=g) > 0.5
    ptr, strides = ours_param.data_ptr(), ours_param.stride()
    ours = ours_cls([ours_param], **kwargs)
    ours.set_masks({ours_param: keep})
    theirs = torch_cls([weight], **kwargs)
    with torch.no_grad():
        weight.masked_fill_(~keep, 0)
    for step in range(3):
        grad = torch.randn(weight.shape, generator=g)
        ours_param.grad = grad.clone() if layout == "sliced" else grad.contiguous(memory_format=torch.channels_last)
        ours_param.grad[~keep] = float("nan")  # never read
        weight.grad = torch.where(keep, grad, torch.zeros_like(grad))
        ours.step()
        theirs.step()
    assert ours_param.data_ptr() == ptr and ours_param.stride() == strides  # no copy kept
    assert_same_state(ours, theirs, [ours_param], [weight])
    assert_pruned_exactly_zero(ours, [ours_param], [keep])
    if layout == "channels_last":
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in ours.state[ours_param].values()
                   if isinstance(v, torch.Tensor) and v.dim() == 4)


def check_fused_grad_scaler_protocol(ours_cls, torch_cls, kwargs: dict, make_params, set_grads) -> None:
    """With fused=True and a GradScaler's grad_scale / found_inf set on the optimizer (a step
    skipped on inf between two taken), ours unscales and steps (or not) with torch_cls's bits."""
    ours_params, their_params = make_params(), make_params()
    ours = ours_cls(ours_params, fused=True, **kwargs)
    theirs = torch_cls(their_params, fused=True, **kwargs)
    assert ours._step_supports_amp_scaling
    for step, inf in ((0, 0.0), (1, 1.0), (2, 0.0)):
        for params, opt in ((ours_params, ours), (their_params, theirs)):
            set_grads(params, step)
            for p in params:
                p.grad.mul_(1024.0)
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(inf)
            opt.step()
            del opt.grad_scale, opt.found_inf
    assert_same_state(ours, theirs, ours_params, their_params)
    for i, (p, q) in enumerate(zip(ours_params, their_params)):
        assert same_bits(p.grad, q.grad), f"unscaled gradient of param {i}: the bits differ"
