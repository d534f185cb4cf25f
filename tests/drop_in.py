"""Shared checks of our drop-in optimizers against torch's originals, over optim_db's inputs."""
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
