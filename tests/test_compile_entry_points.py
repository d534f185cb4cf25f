"""Which public entry points torch.compile(fullgraph=True) traces whole (issue 38, item 14): every
function at the top level and MaskedSGD's step, on the inductor and aot_eager backends, each
giving the eager result bit for bit; MaskedAdamW's step compiles as torch.optim.AdamW's does
(torch breaks the graph around every step it takes: fullgraph=True refuses AdamW itself)."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.optim import MaskedAdamW, MaskedSGD

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BACKENDS = ["aot_eager", "inductor"]


def weight(seed=0, shape=(16, 40)):  # rows of 40: the mask's last word is partly padding
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"sparsity": "2:4"}, {"sparsity": 0.5, "block": (4, 8)},
                                    {"sparsity": [0.3, 0.6]}])
def test_selection_front_ends(backend, kwargs):
    tensors = [weight(0), weight(1)]

    def masks(a, b):
        return [m.packed for m in dk.magnitude_masks([a, b], **kwargs)]
    assert all(torch.equal(x, y) for x, y in zip(compiled(masks, backend)(*tensors), masks(*tensors)))
    if "block" not in kwargs and kwargs["sparsity"] != "2:4":
        def thresholds(a, b):
            return dk.magnitude_thresholds([a, b], kwargs["sparsity"])
        assert torch.equal(compiled(thresholds, backend)(*tensors), thresholds(*tensors))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_front_ends(backend):
    mask = dk.magnitude_masks([weight(0)], 0.5)[0]

    def steps(p, g, buf, m, v, s):
        dk.apply_masks_([g], [mask])
        dk.masked_sgd_([p], [g], [buf], [mask], lr=0.1, momentum=0.9, weight_decay=1e-4)
        dk.masked_adamw_([p], [g], [m], [v], [None], [s], [mask], lr=0.01)
        return dk.masked_linear(torch.ones(3, 40), p, mask, None)

    def fresh():
        return [weight(0), weight(1), torch.zeros(16, 40), torch.zeros(16, 40), torch.zeros(16, 40),
                torch.zeros(())]
    eager, traced = fresh(), fresh()
    expected = steps(*eager)
    assert torch.equal(compiled(steps, backend)(*traced), expected)
    assert all(torch.equal(a, b) for a, b in zip(traced, eager))


def _model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.randn(8, 40), torch.randint(0, 4, (8,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,fullgraph", [(MaskedSGD, True), (MaskedAdamW, False)])
def test_optimizer_steps(backend, cls, fullgraph):
    runs = []
    for compile_step in (False, True):
        model, x, y = _model_and_batch()
        opt = cls(model.parameters(), lr=0.05, **({"momentum": 0.9} if cls is MaskedSGD else {}))
        opt.prune(0.5)
        step = opt.step
        if compile_step:
            torch._dynamo.reset()
            step = torch.compile(opt.step, fullgraph=fullgraph, backend=backend)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            step()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert all(bool((p[~m.to_bool()] == 0).all()) for p, m in opt.masks.items())
    if cls is MaskedSGD:
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    else:  # traced, torch's AdamW takes its compile-time arithmetic (tensor step counts), not eager's bits
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b)


def test_torch_adamw_itself_refuses_fullgraph():
    """Why MaskedAdamW's step is not traced whole: torch's own optimizer step breaks the graph."""
    model, x, y = _model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(Exception, match="graph_break"):
        compiled(opt.step, "aot_eager")()
