"""N:M masks ("2:4"): exact against the reference on every CPU backend, wherever a sparsity goes."""
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
def test_nm_masks_are_exact_on_every_backend(cpu_backend, dtype, n, m):
    for shape, seed in (((7, m * 9), 0), ((3, 2, m * 8), 1), ((m * 40,), 2), ((5, m * 64), 3)):
        w = adversarial(shape, dtype, seed)
        got = dk.magnitude_masks([w], f"{n}:{m}")[0].to_bool()
        assert torch.equal(got, R.nm_masks([w], n, m)[0]), (shape, dtype)
        rows = got.reshape(-1, m).sum(1)
        assert bool((rows == n).all())


def test_equal_weights_prune_the_lower_index_and_nan_ranks_highest(cpu_backend):
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
