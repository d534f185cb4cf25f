"""N:M masks ("2:4"): exact against the reference on every backend (C++, torch, Triton), wherever a sparsity goes."""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import reference as R
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW, MaskedSGD

PATTERNS = [(2, 4), (1, 4), (4, 8), (3, 6), (1, 2), (7, 12), (5, 32)]


def adversarial(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).round().to(dtype)  # many ties
    flat = w.view(-1)
    flat[0], flat[3], flat[5] = float("nan"), float("inf"), -0.0
    flat[8:16] = float("nan")
    flat[-4:] = 1.0  # a group of equal weights: the lower indices are pruned
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
def test_nm_masks_are_exact_on_every_backend(backend, dtype, n, m):
    for shape, seed in (((7, m * 9), 0), ((3, 2, m * 8), 1), ((m * 40,), 2), ((5, m * 64), 3)):
        w = adversarial(shape, dtype, seed)
        got = dk.magnitude_masks([w], f"{n}:{m}")[0].to_bool()
        assert torch.equal(got, R.nm_masks([w], n, m)[0]), (shape, dtype)
        rows = got.reshape(-1, m).sum(1)
        assert bool((rows == n).all())


def test_equal_weights_prune_the_lower_index_and_nan_ranks_highest(backend):
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, float("nan"), 0.0, -0.0, 5.0]])
    keep = dk.magnitude_masks(w, "2:4")[0].to_bool()
    assert keep.tolist() == [[False, False, True, True, True, False, False, True]]


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:0", "a:b", "2:64", "4:4"])
def test_malformed_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="is not an N:M pattern"):
        dk.magnitude_masks(torch.randn(4, 8), bad)


def test_a_row_length_not_a_multiple_of_m_names_the_tensor():
    with pytest.raises(ValueError, match=r"tensors\[1\] of shape \(3, 6\).*not a multiple of M=4"):
        dk.magnitude_masks([torch.randn(2, 8), torch.randn(3, 6)], "2:4")
    with pytest.raises(ValueError, match="no one threshold per tensor"):
        dk.magnitude_thresholds(torch.randn(2, 8), "2:4")


def test_nm_op_opcheck():
    args = ([torch.randn(4, 8), torch.randn(2, 12, dtype=torch.float64)], 2, 4)
    torch.library.opcheck(torch.ops.dsd_kernels.nm_masks.default, args)


@pytest.mark.parametrize("holder", ["MaskedSGD", "MaskedAdamW", "AdamW+scheduler", "dict"])
def test_nm_sparsity_wherever_a_sparsity_goes(cpu_backend, holder):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if holder == "MaskedSGD":
        opt = MaskedSGD(model.parameters(), lr=0.1)
        masks = opt.prune("2:4")
    elif holder == "MaskedAdamW":
        opt = MaskedAdamW(model.parameters())
        masks = opt.prune("2:4", model=model)
    else:
        opt = torch.optim.AdamW(model.parameters())
        sparsity = "2:4" if holder != "dict" else {r"^0\.": "2:4", r"^2\.": "1:4"}
        dsd = DSDScheduler(opt, model=model, sparsity=sparsity, dense_epochs=1, sparse_epochs=1, redense_epochs=1)
        dsd.step()
        masks = dsd.masks
    for p, mask in masks.items():
        kept = mask.to_bool().reshape(-1, 4).sum(1)
        expected = 1 if holder == "dict" and p is model[2].weight else 2
        assert bool((kept == expected).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_selection_adversarial_cases_as_nm(backend, dtype):
    """Every adversarial case of the selection tests (ties, signed zeros, inf/NaN, denormals),
    cut to whole groups, through every pattern."""
    from .test_magnitude_select import adversarial
    for case, tensors in adversarial(dtype).items():
        for t in tensors:
            for n, m in PATTERNS:
                flat = t.reshape(-1)[: t.numel() // m * m].cpu()
                if flat.numel():
                    got = dk.magnitude_masks([flat], f"{n}:{m}")[0].to_bool()
                    assert torch.equal(got, R.nm_masks([flat], n, m)[0]), (case, n, m)


def test_sparsify_with_two_four_and_the_semi_structured_export_on_cpu():
    from dsd_kernels.nn import MaskedLinear, sparsify, to_semi_structured, two_four_linears
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4),
                                torch.nn.Linear(4, 6))
    dense_last = model[3].weight.detach().clone()
    sparsify(model, "2:4", exclude=[r"^3\."])
    assert isinstance(model[0], MaskedLinear) and isinstance(model[2], MaskedLinear)
    for layer in (model[0], model[2]):
        keep = layer.mask.to_bool()
        assert torch.equal(keep, R.nm_masks([layer.weight.detach()], 2, 4)[0] | keep)
        assert bool((keep.reshape(-1, 4).sum(1) == 2).all())
    assert [name for name, _ in two_four_linears(model)] == ["0", "2"]
    with pytest.raises(RuntimeError, match=r"to_semi_structured needs CUDA.*0\.weight is on cpu"):
        to_semi_structured(model)
    assert isinstance(model[0], MaskedLinear) and torch.equal(model[3].weight, dense_last)  # nothing changed
    with pytest.warns(UserWarning, match="no Linear weight of the model is 2:4"):
        to_semi_structured(torch.nn.Sequential(torch.nn.Linear(8, 8)))
