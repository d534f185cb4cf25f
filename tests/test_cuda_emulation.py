"""The CUDA kernels of csrc/cuda, compiled for the CPU emulation of tests/_helpers/cuda_emulation
(real threads, barriers and ballots; see emulation.h), against reference/ (the AdamW kernel
against the Triton kernel's CUDA rounding, bit for bit: the same operations, each IEEE-rounded).

This checks the kernels' logic (tiles, digits, tie ranks across tiles, the multi-tensor tables,
the SGD arithmetic) on machines without a GPU. Their speed and anything specific to the hardware
are checked by the `gpu` tests, where the real CUDA build runs the whole suite as the cpp backend.
Building the emulation takes about a minute on two cores, hence `slow`.
"""
from pathlib import Path

import pytest
import torch

from dsd_kernels import reference as R

from ._helpers.interpreter import require_interpreter_feature
from .test_masked_sgd import OPTIONS, TOL
from .test_magnitude_select import FLOATS, SPARSITIES, adversarial

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "_helpers" / "cuda_emulation"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from torch.utils.cpp_extension import load
    load(name="dsd_kernels_cuda_emu",
         sources=[str(HERE / f"{name}.cpp")
                  for name in ("schemas", "magnitude_select", "masked_sgd", "masked_adamw")],
         extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off", "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"], is_python_module=False,
         build_directory=str(tmp_path_factory.mktemp("cuda_emulation")))
    return torch.ops.dsd_kernels_cuda_emu


def check_selection(emu, tensors, sparsities, thresholds_only_too=True):
    thresholds, masks = emu.magnitude_select(tensors, sparsities, True)
    want = torch.tensor(R.magnitude_thresholds(tensors, sparsities), dtype=torch.float64)
    same = (thresholds == want) | (thresholds.isnan() & want.isnan())
    assert same.all(), f"thresholds {thresholds} != reference {want}"
    if thresholds_only_too:  # the call without masks (the same selection, no mask pass)
        only_thresholds, no_masks = emu.magnitude_select(tensors, sparsities, False)
        torch.testing.assert_close(only_thresholds, thresholds, rtol=0, atol=0, equal_nan=True)
        assert len(no_masks) == 0
    for i, (m, keep) in enumerate(zip(masks, R.magnitude_masks(tensors, sparsities))):
        assert torch.equal(m, R.pack_bits(keep)), f"mask {i} differs from reference"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_adversarial_cases_in_one_call(emu, dtype):
    # every adversarial case of test_magnitude_select at once: one multi-tensor table per call
    tensors = [t.cpu() for case in adversarial(dtype).values() for t in case]
    # the emulation runs real threads through every barrier: slow on 2 cores, so the call without
    # masks is checked once per dtype, on the call that mixes every kind of sparsity
    for s in SPARSITIES:
        check_selection(emu, tensors, [s] * len(tensors), thresholds_only_too=False)
    check_selection(emu, tensors, [(0.07 * i) % 1.0 for i in range(len(tensors))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ties_split_across_tiles_and_rows(emu, dtype):
    # ties cut in the middle of a tensor spanning many 1024-element word tiles, rows not a
    # multiple of 32 columns, and a tensor with no tiles between two that have some
    g = torch.Generator().manual_seed(3)
    tensors = [torch.full((10000,), 0.25, dtype=dtype),
               torch.randn(130, 100, generator=g).round().to(dtype),
               torch.empty(0, 7, dtype=dtype),
               torch.randn(9000, generator=g).round(decimals=1).to(dtype)]
    for s in (0.123, 0.5, 0.77):
        check_selection(emu, tensors, [s] * 4)


def test_mixed_dtypes_and_large_tile_counts(emu):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(20000, generator=g).round(decimals=2),
               torch.randn(64, 3, 3, 3, generator=g).half(),
               torch.randn(700, generator=g).double(),
               torch.randn(300, 41, generator=g).bfloat16()]
    tensors[0][::97] = float("nan")
    tensors[3][5::50] = float("inf")
    check_selection(emu, tensors, [0.4, 0.9, 0.0, 0.999])


def test_selection_errors_name_the_argument(emu):
    with pytest.raises(RuntimeError, match=r"sparsities\[1\]"):
        emu.magnitude_select([torch.randn(5), torch.randn(5)], [0.5, 1.5], True)


SGD_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def sgd_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(33, 70), (17,), (4, 3, 3, 3), (1,), (5000,), (2, 0)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    keeps = [(torch.rand(p.shape, generator=g) > 0.5) if p.dim() >= 2 else None for p in params]
    keeps[4] = torch.rand(5000, generator=g) > 0.3  # a masked 1-D tensor of several tiles
    for p, k in zip(params, keeps):
        if k is not None:
            p.masked_fill_(~k, 0)
    return params, keeps


@pytest.mark.parametrize("dtype", SGD_DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS[::2], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_masked_sgd_matches_reference(emu, dtype, opts):
    params, keeps = sgd_inputs(dtype)
    ref = [p.clone() for p in params]
    words = [None if k is None else R.pack_bits(k) for k in keeps]
    momentum = opts["momentum"]
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    ref_bufs = [None] * len(params)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
        for gr, k in zip(grads, keeps):
            if k is not None:
                gr[~k] = float("nan")  # must not leak into pruned weights or momentum
        emu.masked_sgd_(params, grads, bufs, words, [step == 0] * len(params) if momentum else [],
                        0.05, momentum, opts["dampening"], opts["weight_decay"], opts["nesterov"],
                        opts["maximize"])
        R.masked_sgd_(ref, grads, ref_bufs, keeps, lr=0.05, **opts)
    for i, (p, q, k) in enumerate(zip(params, ref, keeps)):
        torch.testing.assert_close(p, q, **TOL[dtype], msg=lambda m: f"params[{i}]: {m}")
        if k is not None:
            assert p[~k].view(-1).eq(0).all() and not p[~k].signbit().any()
            if momentum:
                assert bufs[i][~k].eq(0).all() and not bufs[i][~k].signbit().any()
        if momentum:
            torch.testing.assert_close(bufs[i], ref_bufs[i], **TOL[dtype])


def test_masked_sgd_errors_name_the_argument(emu):
    p, g = torch.randn(4, 40), torch.randn(4, 40)
    with pytest.raises(RuntimeError, match=r"mask_words\[0\]"):
        emu.masked_sgd_([p], [g], [], [torch.zeros(3, dtype=torch.int32)], [], 0.1, 0.0, 0.0, 0.0,
                        False, False)
    with pytest.raises(RuntimeError, match=r"grads\[0\]"):
        emu.masked_sgd_([p], [g.double()], [], [None], [], 0.1, 0.0, 0.0, 0.0, False, False)


ADAMW_OPTIONS = [dict(weight_decay=wd, amsgrad=a, maximize=mx, beta1=b1)
                 for wd, a, mx, b1 in [(0.0, False, False, 0.9), (1e-2, True, True, 0.9),
                                       (1e-2, False, True, 0.3), (0.0, True, False, 0.3)]]


def adamw_step_emulated(emu, params, grads, m, v, vmax, steps, words, opts):
    from dsd_kernels.backends._adamw_steps import advance_steps
    step_sizes, bc2_sqrts = advance_steps(steps, 1e-2, opts["beta1"], 0.999)
    emu.masked_adamw_(params, grads, m, v, vmax if opts["amsgrad"] else [], words, step_sizes, bc2_sqrts,
                      1e-2, opts["beta1"], 0.999, 1e-8, opts["weight_decay"], opts["amsgrad"], opts["maximize"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("opts", ADAMW_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_masked_adamw_matches_the_triton_kernels_cuda_rounding_bit_for_bit(emu, dtype, opts):
    """The two GPU AdamW kernels compute the same IEEE-rounded operations in the same order
    (torch's CUDA foreach AdamW, which the Triton one matched bit for bit on an H200): the
    emulated CUDA kernel and the Triton kernel under the interpreter give the same bits; pruned
    weights and moments are +0 whatever the gradient held there."""
    if "triton" not in __import__("dsd_kernels").available_backends():
        pytest.skip("triton backend unavailable")
    require_interpreter_feature("fma")  # the CUDA rounding fuses multiply-adds
    from dsd_kernels.backends.triton import masked_adamw as T
    params, keeps = sgd_inputs(dtype)
    words = [None if k is None else R.pack_bits(k) for k in keeps]
    runs = {}
    for name in ("emulated", "triton"):
        p = [t.clone() for t in params]
        m, v = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
        vmax = [torch.zeros_like(t) for t in p]
        steps = [torch.tensor(0.0) for _ in p]
        g = torch.Generator().manual_seed(9)
        for step in range(3):
            grads = [torch.randn(t.shape, generator=g).to(dtype) for t in p]
            for gr, k in zip(grads, keeps):
                if k is not None:
                    gr[~k] = float("nan")
            if name == "emulated":
                adamw_step_emulated(emu, p, grads, m, v, vmax, steps, words, opts)
            else:
                T.masked_adamw_(p, grads, m, v, vmax, steps, words, lr=1e-2, beta2=0.999, eps=1e-8,
                                cuda_foreach=True, **opts)
        runs[name] = p + m + v + (vmax if opts["amsgrad"] else [])
    for i, (a, b) in enumerate(zip(runs["emulated"], runs["triton"])):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"tensor {i}"
    for i, k in enumerate(keeps):
        if k is not None:
            for t in runs["emulated"][i::len(params)]:
                assert t[~k].eq(0).all() and not t[~k].signbit().any()


def test_masked_adamw_errors_name_the_argument(emu):
    p = torch.randn(4, 40)
    state = [torch.zeros_like(p) for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"mask_words\[0\]"):
        emu.masked_adamw_([p], [state[0]], [state[1]], [state[2]], [], [torch.zeros(3, dtype=torch.int32)],
                          [0.1], [0.5], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] is Half"):
        h = p.half()
        emu.masked_adamw_([h], [h.clone()], [h.clone()], [h.clone()], [], [None], [0.1], [0.5],
                          1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
