"""One masking pass after the step for torch's elementwise optimizers (issue 39, item 2): the
weights and state tensors after every step are bit-identical to two passes (gradients masked
before the step, weights after) in every optim_db configuration of every optimizer the table
covers, with NaN and inf gradients at pruned entries; everything else keeps two passes."""
import pytest
import torch

from dsd_kernels.optim import OptimizerMasks
from dsd_kernels.optim.masking import ELEMENTWISE_STATE

SHAPES = [(6, 40), (5, 3, 3), (7,)]  # the 1-D one stays unmasked


def _configs():
    from torch.testing._internal.common_optimizers import (_get_optim_inputs_including_global_cliquey_kwargs,
                                                           optim_db)
    for info in optim_db:
        if info.optim_cls not in ELEMENTWISE_STATE:
            continue
        for optim_input in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info):
            kwargs = dict(optim_input.kwargs)
            foreach = [None] if kwargs.get("fused") or kwargs.get("differentiable") else [False, True]
            for flag in foreach:
                case = {**kwargs, **({} if flag is None else {"foreach": flag})}
                yield pytest.param(info.optim_cls, case, id=f"{info.optim_cls.__name__}-{optim_input.desc}-"
                                                             f"{'' if flag is None else 'foreach' if flag else 'for'}")


def _run(cls, kwargs, elementwise, steps=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]  # leaves that need no grad: any flag steps them
    opt = cls(params, **kwargs)
    masks = OptimizerMasks(opt, elementwise=elementwise)
    keep = {p: torch.rand(p.shape, generator=gen) > 0.4 for p in params[:2]}
    masks.set_masks(keep)
    history = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for p, k in keep.items():  # adversarial gradients where pruned
            pruned = (~k).nonzero()
            p.grad[tuple(pruned[0])] = float("nan")
            p.grad[tuple(pruned[1])] = float("inf")
        opt.step()
        history.append([p.clone() for p in params] +
                       [v.clone() for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)])
    return masks, history


@pytest.mark.parametrize("cls,kwargs", list(_configs()))
def test_one_pass_gives_the_bits_of_two(cls, kwargs):
    one_pass, fast = _run(cls, kwargs, None)
    two_pass, slow = _run(cls, kwargs, False)
    assert one_pass.one_pass_state is not None and two_pass.one_pass_state is None
    for a_step, b_step in zip(fast, slow):
        assert len(a_step) == len(b_step)
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b) or (a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()))


class Drift(torch.optim.SGD):
    """A subclass: it may step otherwise, so it keeps two passes unless declared elementwise."""


def test_other_optimizers_keep_two_passes_unless_declared():
    p = torch.zeros(4, 4)
    assert OptimizerMasks(Drift([p], lr=0.1)).one_pass_state is None
    assert OptimizerMasks(torch.optim.Rprop([p])).one_pass_state is None
    assert OptimizerMasks(Drift([p], lr=0.1), elementwise=("momentum_buffer",)).one_pass_state == ("momentum_buffer",)
    with pytest.raises(TypeError, match="elementwise"):
        OptimizerMasks(torch.optim.SGD([p], lr=0.1), elementwise="momentum_buffer")


def test_the_scheduler_still_masks_gradients_for_clipping():
    from dsd_kernels.dsd import DSDScheduler
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5)
    dsd.step()
    assert dsd.optimizer_masks.one_pass_state == ELEMENTWISE_STATE[torch.optim.Adam]
    model(torch.randn(3, 8)).sum().backward()
    dsd.mask_gradients()
    for p, m in dsd.masks.items():
        assert bool((p.grad[~m.to_bool()] == 0).all())


def test_state_that_appears_after_the_first_step_is_masked_too():
    """The one pass's cached plan is rebuilt when the optimizer's state changes, over the state
    keys the optimizer declares: a masked weight without a gradient at the first step (no state
    then, while an unmasked one gets its state) has its moments masked once it gets one."""
    gen = torch.Generator().manual_seed(0)
    late, other = (torch.nn.Parameter(torch.randn(6, 40, generator=gen)) for _ in range(2))
    keep = torch.rand(6, 40, generator=gen) > 0.5
    opt = torch.optim.Adam([late, other])
    masks = OptimizerMasks(opt)
    masks.set_masks({late: keep})
    other.grad = torch.randn(6, 40, generator=gen)
    opt.step()  # `late` has no gradient: no state yet
    assert late not in opt.state
    late.grad = torch.randn(6, 40, generator=gen)  # pruned entries too: the one pass masks after the step
    opt.step()
    for t in (late, opt.state[late]["exp_avg"], opt.state[late]["exp_avg_sq"]):
        assert torch.all(t.detach()[~keep] == 0)
