"""magnitude_thresholds / magnitude_masks against reference/, on every backend present."""
import math

import pytest
import torch
from torch.nn.utils import prune

import dsd_kernels as dk
from dsd_kernels import reference as R
from dsd_kernels.masks import Mask

from .conftest import DEVICE, require_backend

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPARSITIES = [0.0, 0.3, 0.5, 0.9, 1.0]


def assert_matches_reference(tensors, sparsity):
    sparsities = sparsity if isinstance(sparsity, list) else [sparsity] * len(tensors)
    got = dk.magnitude_thresholds(tensors, sparsity)
    want = torch.tensor(R.magnitude_thresholds([t.cpu() for t in tensors], sparsities),
                        dtype=got.dtype)
    same = (got.cpu() == want) | (got.cpu().isnan() & want.isnan())
    assert same.all(), f"thresholds {got} != reference {want}"
    masks = dk.magnitude_masks(tensors, sparsity)
    ref_masks = R.magnitude_masks([t.cpu() for t in tensors], sparsities)
    for i, (m, ref, t, s) in enumerate(zip(masks, ref_masks, tensors, sparsities)):
        assert isinstance(m, Mask) and m.shape == t.shape
        assert torch.equal(m.packed.cpu(), R.pack_bits(ref)), f"mask {i} differs from reference"
        assert m.numel - m.count() == round(s * t.numel())


def adversarial(dtype):
    g = torch.Generator().manual_seed(1)
    nan, inf = float("nan"), float("inf")
    tiny = torch.finfo(dtype).tiny
    cases = {
        "random": [torch.randn(4097, generator=g)],
        "all_equal": [torch.full((1023,), 0.25)],
        "many_zeros": [torch.where(torch.rand(2000, generator=g) < 0.7, 0.0,
                                   torch.randn(2000, generator=g))],
        "signed_zeros": [torch.tensor([0.0, -0.0] * 40 + [1.0, -2.0])],
        "inf_nan": [torch.tensor([nan, 1.0, -inf, 0.0, inf, nan, -1.0, 2.0, -nan])],
        "denormals": [torch.tensor([tiny / 4, -tiny / 2, tiny, 0.0, -tiny / 4, 1.0, tiny / 2])],
        "duplicates_at_threshold": [torch.randn(300, generator=g).round()],
        "one_element": [torch.tensor([-3.0])],
        "odd_shapes": [torch.randn(7, generator=g), torch.randn(3, 5, 7, generator=g),
                       torch.randn(33, 65, generator=g)],
        "conv_4d": [torch.randn(16, 3, 3, 3, generator=g), torch.randn(8, 16, 1, 1, generator=g)],
    }
    return {k: [t.to(dtype).to(DEVICE) for t in v] for k, v in cases.items()}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(adversarial(torch.float32)))
def test_adversarial_matches_reference(backend, dtype, case):
    tensors = adversarial(dtype)[case]
    for s in SPARSITIES:
        assert_matches_reference(tensors, s)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_whole_model_list_with_per_layer_sparsity(backend, dtype):
    g = torch.Generator().manual_seed(2)
    shapes = [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (10, 64), (10,), (1,), (0,), (5, 0)]
    tensors = [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]
    tensors[2][:5] = 0.0  # ties at zero inside one layer
    sparsities = [0.5, 0.0, 0.75, 1.0, 0.3, 0.5, 0.5, 0.9]
    assert_matches_reference(tensors, sparsities)


def test_mixed_dtypes_in_one_call(backend):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(100, generator=g).to(dt).to(DEVICE) for dt in FLOATS]
    assert dk.magnitude_thresholds(tensors, 0.5).dtype == torch.float64
    assert_matches_reference(tensors, [0.1, 0.5, 0.6, 0.9])


def test_round_half_to_even_count(backend):
    # Python's round: round(0.5 * 5) == 2 and round(0.5 * 7) == 4, as torch.nn.utils.prune
    for n, expected in [(5, 2), (7, 4), (3, 2), (1, 0)]:
        m = dk.magnitude_masks(torch.arange(1.0, n + 1, device=DEVICE), 0.5)[0]
        assert m.numel - m.count() == expected == round(0.5 * n)


def test_threshold_is_kth_smallest_magnitude(backend):
    w = torch.tensor([-5.0, 3.0, -1.0, 4.0, 2.0], device=DEVICE)
    assert dk.magnitude_thresholds(w, 0.4).tolist() == [2.0]
    assert dk.magnitude_thresholds(w, 0.0).tolist() == [-math.inf]
    assert dk.magnitude_thresholds(w, 1.0).tolist() == [5.0]
    assert dk.magnitude_masks(w, 0.4)[0].to_bool().tolist() == [True, True, False, True, False]


def test_ties_pruned_lowest_index_first(backend):
    w = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 1.0], device=DEVICE)
    keep = dk.magnitude_masks(w, 0.5)[0].to_bool().tolist()  # k = 3: 0.5, then indices 0 and 1
    assert keep == [False, False, True, False, True, True]


def test_matches_torch_prune_l1_unstructured(backend):
    g = torch.Generator().manual_seed(4)
    for shape, s in [((64, 33), 0.5), ((16, 8, 3, 3), 0.37), ((1000,), 0.9)]:
        w = torch.randn(shape, generator=g).round(decimals=1)  # many ties
        module = torch.nn.Linear(1, 1)
        module.weight = torch.nn.Parameter(w.clone())
        prune.l1_unstructured(module, "weight", amount=s)
        torch_pruned = ~module.weight_mask.bool()
        ours = ~dk.magnitude_masks(w.to(DEVICE), s)[0].to_bool().cpu()
        assert ours.sum() == torch_pruned.sum()
        # torch's tie order is unspecified: compare the multiset of pruned magnitudes
        assert torch.equal(w[ours].abs().sort().values, w[torch_pruned].abs().sort().values)


def test_noncontiguous_and_requires_grad(backend):
    w = torch.randn(40, 30, device=DEVICE, requires_grad=True)
    assert_matches_reference([w.t(), w[:, ::3]], 0.5)


LARGE = 2**20 + 7  # the C++ select samples every 64th key here for its candidate range
# a layer's kept or pruned subset: the C++ bracket select samples every 4th key (2^15 + 3) or
# 2^14 keys (100003), and several such tensors in one call are selected on several threads
MID = (2**15 + 3, 100_003)


def cpp_sample_stride(n):
    """The stride of the C++ local select's sample (csrc/cpu/selection.h sample_bracket)."""
    return n // min(n // 4, max(n // 64, 2**14), 2**16)


def large_case(case, dtype, n=LARGE):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, generator=g)
    stride = cpp_sample_stride(n)
    spread = 10 ** (6 * torch.rand(w[::stride].shape, generator=g))  # sampled keys: 160 digits
    if case == "sample_misleads":  # the sample predicts about 1e3, the rest is tiny: a miss
        w = torch.rand(n, generator=g) * 1e-3
        w[::stride] = spread
    elif case == "gather_overflows":  # the rest all sit at 1e3, inside the predicted range
        w = torch.full((n,), 1000.0)
        w[::stride] = spread
    elif case == "all_equal":
        w = torch.full((n,), 0.25)
    elif case == "rounded":  # many ties inside the bracket, the k-th key among them
        w = (torch.randn(n, generator=g) * 100).round() / 100
    elif case == "signed_zeros_and_denormals":
        w[::3] = -0.0
        w[1::5] = torch.finfo(dtype).tiny / 4
    elif case == "inf_nan":  # the k-th key is inf or NaN at high sparsity
        w[torch.rand(n, generator=g) < 0.3] = float("inf")
        w[torch.rand(n, generator=g) < 0.3] = float("nan")
    return w.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["random", "sample_misleads", "gather_overflows", "all_equal", "inf_nan", "rounded",
                                  "signed_zeros_and_denormals"])
@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_large_tensors_every_candidate_path(name, case, dtype):
    # the C++ select brackets the k-th key by a sample (then by a sampled digit range in its radix
    # select); these cases make the sample right, wrong, overflowing and useless (ties), the
    # k-th key inf/NaN, and the bracket reach either end of the keys (s near 0 and 1)
    require_backend(name)
    with dk.use_backend(name):
        w = large_case(case, dtype)
        assert_matches_reference([w, w[:1000]], [0.5, 0.3])
        assert_matches_reference([w, w], [0.97, 0.0005])
        assert_matches_reference([w], 0.9999)
        got = dk.magnitude_thresholds([w, w], [0.5, 0.97]).double().cpu().tolist()
        want = R.magnitude_thresholds([w.cpu(), w.cpu()], [0.5, 0.97])
        assert [g == x or (g != g and x != x) for g, x in zip(got, want)] == [True, True], (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["random", "sample_misleads", "gather_overflows", "inf_nan", "rounded"])
def test_mid_size_tensors_several_at_once(case, dtype):
    require_backend("cpp")
    with dk.use_backend("cpp"):
        ws = [large_case(case, dtype, n) for n in MID]
        assert_matches_reference(ws + [ws[0][:5000], ws[1]], [0.5, 0.97, 0.3, 0.0005])


def test_empty_list():
    assert dk.magnitude_masks([], 0.5) == []
    assert dk.magnitude_thresholds([], 0.5).numel() == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_sparsity_value(bad):
    with pytest.raises(ValueError, match="sparsity"):
        dk.magnitude_masks([torch.randn(4)], bad)
    with pytest.raises(ValueError, match=r"sparsity\[1\]"):
        dk.magnitude_thresholds([torch.randn(4), torch.randn(4)], [0.5, bad])


def test_bad_sparsity_type_and_length():
    with pytest.raises(ValueError, match="sparsity has 3 values but there are 2 tensors"):
        dk.magnitude_masks([torch.randn(4), torch.randn(4)], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="sparsity 'half' is not an N:M pattern"):  # a string is N:M
        dk.magnitude_masks([torch.randn(4)], "half")
    with pytest.raises(TypeError, match="sparsity"):
        dk.magnitude_masks([torch.randn(4)], True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_tensor_is_type_error(dtype):
    with pytest.raises(TypeError, match=r"tensors\[1\].*floating"):
        dk.magnitude_masks([torch.randn(4), torch.zeros(4, dtype=dtype)], 0.5)


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        dk.magnitude_thresholds([[1.0, 2.0]], 0.5)
    with pytest.raises(TypeError, match="tensors"):
        dk.magnitude_thresholds(3.0, 0.5)


def test_mixed_devices_is_value_error():
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        dk.magnitude_masks([torch.randn(4), torch.randn(4, device="meta")], 0.5)


def test_opcheck():
    tensors = [torch.randn(10, 20), torch.randn(7, dtype=torch.float64), torch.zeros(3, 3)]
    for op in (torch.ops.dsd_kernels.magnitude_thresholds.default,
               torch.ops.dsd_kernels.magnitude_masks.default):
        torch.library.opcheck(op, (tensors, [0.5, 0.3, 1.0]))


def test_torch_compile_fullgraph():
    tensors = [torch.randn(10, 20), torch.randn(50)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def prune_fraction(ws):
        t = dk.magnitude_thresholds(ws, 0.5)
        return [(w.abs() > th).float().mean() for w, th in zip(ws, t)]

    assert [float(f) for f in prune_fraction(tensors)] == [0.5, 0.5]


def test_any_iterable_of_tensors_and_of_sparsities(backend):
    import numpy as np
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5)).to(DEVICE)
    weights = [p for p in model.parameters()]
    want = dk.magnitude_masks(weights, [0.5, 0.1, 0.7, 0.2])
    got = dk.magnitude_masks(model.parameters(), (s for s in [0.5, 0.1, 0.7, 0.2]))  # generators
    assert got == want
    assert dk.magnitude_masks(model.parameters(), np.float32(0.5)) == dk.magnitude_masks(weights, 0.5)
    assert dk.magnitude_masks(weights, torch.tensor([0.5, 0.1, 0.7, 0.2])) == want
    assert torch.equal(dk.magnitude_thresholds(iter(weights), 0.3), dk.magnitude_thresholds(weights, 0.3))
    with pytest.raises(TypeError, match="iterable of tensors, got int"):
        dk.magnitude_masks(3, 0.5)


def test_direct_op_calls_check_their_inputs():
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        torch.ops.dsd_kernels.magnitude_masks([torch.randn(4), torch.arange(4)], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"sparsities\[0\] must be in \[0, 1\], got 1.5"):
        torch.ops.dsd_kernels.magnitude_thresholds([torch.randn(4)], [1.5])
    with pytest.raises(ValueError, match="2 tensors but 1 sparsities"):
        torch.ops.dsd_kernels.magnitude_masks([torch.randn(4), torch.randn(3)], [0.5])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int64"):
        torch.ops.dsd_kernels.magnitude_masks([mode.from_tensor(torch.arange(4))], [0.5])
