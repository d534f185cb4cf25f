"""mask_update (RigL/SET's drop-and-grow) against reference/, on every backend present, on
adversarial weights and scores: exact dropped and grown sets, constant kept count."""
import math

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels.masks import Mask
from dsd_kernels.reference.mask_update import mask_update as reference_update

from .conftest import DEVICE, require_backend

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def cases(dtype):
    g = torch.Generator().manual_seed(3)
    nan, inf = float("nan"), float("inf")
    tiny = torch.finfo(dtype).tiny

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    out = {
        "random": (rnd(64, 65), rnd(64, 65), 0.7),
        "all_equal": (torch.full((33, 31), 0.25), torch.full((33, 31), -1.0), 0.5),
        "many_zeros": (torch.where(torch.rand(40, 50, generator=g) < 0.6, 0.0, rnd(40, 50)),
                       torch.where(torch.rand(40, 50, generator=g) < 0.6, -0.0, rnd(40, 50)), 0.3),
        "signed_zeros": (torch.tensor([[0.0, -0.0] * 20 + [1.0, -2.0]]), torch.tensor([[-0.0, 0.0] * 21]), 0.5),
        "inf_nan": (torch.tensor([[nan, 1.0, -inf, 0.0, inf, nan, -1.0, 2.0, -nan, 3.0]]),
                    torch.tensor([[1.0, nan, 2.0, -inf, 0.5, inf, nan, -0.0, 4.0, -nan]]), 0.4),
        "denormals": (torch.tensor([[tiny / 4, -tiny / 2, tiny, 0.0, -tiny / 4, 1.0, tiny / 2, 2.0]]),
                      torch.tensor([[tiny, -tiny / 4, 0.0, tiny / 2, 1.0, -tiny, 3.0, tiny / 4]]), 0.5),
        "rounded_duplicates": (rnd(30, 20).round(), rnd(30, 20).round(), 0.5),
        "conv_4d": (rnd(16, 3, 3, 3), rnd(16, 3, 3, 3), 0.8),
    }
    return {k: (w.to(dtype).to(DEVICE), s.to(dtype).to(DEVICE), sp) for k, (w, s, sp) in out.items()}


def start_mask(w, sparsity):
    """A mask that is not the weights' own magnitude mask (so drops are not just its edge)."""
    g = torch.Generator().manual_seed(w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[torch.randperm(w.numel(), generator=g)[:round(sparsity * w.numel())]] = False
    return Mask.from_bool(keep.reshape(w.shape).to(w.device))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(cases(torch.float32)))
def test_matches_reference(backend, dtype, case):
    w, s, sparsity = cases(dtype)[case]
    mask = start_mask(w, sparsity)
    most = min(mask.count(), mask.numel - mask.count())
    for k in sorted({0, 1, most // 3, most}):
        new = dk.mask_update(w, s, [mask], [k])[0]
        want = reference_update([w.cpu()], [s.cpu()], [mask.to_bool().cpu()], [k])[0]
        assert torch.equal(new.to_bool().cpu(), want), f"{case} k={k}"
        assert new.count() == mask.count()
        before, after = mask.to_bool(), new.to_bool()
        assert int((before & ~after).sum()) == k and int((after & ~before).sum()) == k


def test_the_reference_drops_smallest_and_grows_largest():
    """The oracle itself, on a case worked by hand: ties by lower index, NaN above +inf."""
    nan = float("nan")
    w = torch.tensor([[3.0, -1.0, 0.5, 1.0, 2.0, 0.0, 9.0, 7.0]])
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, nan, 5.0, 1.0]])
    keep = torch.tensor([[True, True, True, True, False, False, False, False]])
    new = reference_update([w], [s], [keep], [2])[0]
    # dropped: |0.5| and then |-1.0| (before |1.0| at a higher index); grown: NaN, then the higher-index 5.0
    assert new.tolist() == [[True, False, False, True, False, True, True, False]]


def test_several_tensors_in_one_call_and_bad_input():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 9, generator=g), torch.randn(5, generator=g), torch.randn(4, 4, 3, generator=g)]
    ss = [torch.randn(w.shape, generator=g) for w in ws]
    masks = [start_mask(w, 0.5) for w in ws]
    got = dk.mask_update(ws, ss, masks, [3, 1, 0])
    want = reference_update(ws, ss, [m.to_bool() for m in masks], [3, 1, 0])
    assert all(torch.equal(a.to_bool(), b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match=r"counts\[0\]=40 .* at most 36 can move"):
        dk.mask_update(ws[0], ss[0], masks[:1], [40])
    # a layer among many (C++: updated on a worker thread) names itself too
    many = ws * 8
    with pytest.raises(ValueError, match=r"counts\[14\]=25 .* at most 24 can move"):
        dk.mask_update(many, ss * 8, masks * 8, [1] * 14 + [25] + [1] * 9)
    with pytest.raises(ValueError, match=r"scores\[0\] has shape"):
        dk.mask_update(ws[0], ss[1], masks[:1], [1])
    with pytest.raises(TypeError, match="one dsd_kernels.Mask per weight"):
        dk.mask_update(ws[0], ss[0], [masks[0].to_bool()], [1])
    with pytest.raises(ValueError, match=r"counts\[0\] must be >= 0"):
        dk.mask_update(ws[0], ss[0], masks[:1], [-1])


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    w, s = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    mask = start_mask(w, 0.5)
    torch.library.opcheck(torch.ops.dsd_kernels.mask_update.default, ([w], [s], [mask.packed], [5]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float16])
def test_scores_of_another_dtype_and_rows_across_threads(backend, score_dtype):
    """SET's scores are fp64 draws for fp32 weights; a tensor of many words is split between
    threads (odd row lengths: words straddle rows)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 1001, generator=g).to(DEVICE)
    s = torch.randn(300, 1001, generator=g).to(score_dtype).to(DEVICE)
    mask = start_mask(w, 0.8)
    new = dk.mask_update(w, s, [mask], [12345])[0]
    want = reference_update([w.cpu()], [s.cpu()], [mask.to_bool().cpu()], [12345])[0]
    assert torch.equal(new.to_bool().cpu(), want)


def subset_masks(shape):
    """Masks that make the C++ split's vector stores run out of room at different places: random,
    long runs kept and pruned, everything kept but the last entry, nothing kept but the first."""
    g = torch.Generator().manual_seed(11)
    n = math.prod(shape)
    runs = (torch.arange(n) // 700) % 3 == 0
    last = torch.ones(n, dtype=torch.bool)
    last[-1] = False
    first = torch.zeros(n, dtype=torch.bool)
    first[0] = True
    return {"random": torch.rand(n, generator=g) < 0.2, "runs": runs, "all_but_last": last, "only_first": first}


@pytest.mark.parametrize("shape", [(256, 1024), (300, 1001), (5, 3, 7, 7)], ids=str)
def test_cpp_split_into_kept_and_pruned_values(shape):
    """mask_subsets (the C++ memory pass) gives w[mask] and s[~mask] in flat order, for 32-bit
    elements of whole-word rows split between threads and of rows ending mid-word."""
    require_backend("cpp")
    from dsd_kernels.backends.cpp.mask_update import mask_subsets
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    s = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32)
    for name, keep in subset_masks(shape).items():
        keep = keep.reshape(shape)
        kept, pruned = mask_subsets([w], [s], [Mask.from_bool(keep).packed])
        assert torch.equal(kept[0], w[keep]), name
        assert torch.equal(pruned[0], s[~keep]), name


def test_a_model_of_layers_updated_at_once(backend):
    """Many layers in one call (C++: the larger alone on every thread, the others one per thread
    from a queue) give each layer's own update."""
    g = torch.Generator().manual_seed(9)
    shapes = [(300, 1001), (64, 576), (64, 3, 7, 7), (10, 64), (256, 64, 1, 1), (7,)]
    ws = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    ss = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    masks = [start_mask(w, 0.8) for w in ws]
    counts = [min(m.count(), m.numel - m.count()) // 3 for m in masks]
    got = dk.mask_update(ws, ss, masks, counts)
    want = reference_update([w.cpu() for w in ws], [s.cpu() for s in ss], [m.to_bool().cpu() for m in masks], counts)
    assert all(torch.equal(a.to_bool().cpu(), b) for a, b in zip(got, want))
