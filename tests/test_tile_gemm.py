"""The C++ backend's kernel for kept tiles (tile_gemm: csrc/cpu/isa, run through
csrc/cpu/masked_linear_tiles.cpp, compiled per vector ISA; this process runs the one
cpu_capability() picks, tests/test_cpu_capability.py runs this file under each) against float64 products and against the ATen matmuls it replaces (DSD_KERNELS_TILE_GEMM=0):
every edge of its register tiles (row remainders, partial tiles in N and K, reductions longer
than its dW slice), bias, empty tiles, and the masked semantics (pruned dW exactly +0; NaN in
pruned weights or in inputs that meet only skipped tiles stays out)."""
import pytest
import torch
import torch.nn.functional as F

import dsd_kernels as dk
from dsd_kernels.backends.tile_structure import tile_structure

if "cpp" not in dk.available_backends():
    pytest.skip("C++ extension not built", allow_module_level=True)

OPS = torch.ops.dsd_kernels_cpp
CAPABILITY = OPS.cpu_capability()  # the ISA tile_gemm runs in this process


@pytest.fixture(params=["tile_gemm", "aten"])
def kernel(request, monkeypatch):
    """Run once with tile_gemm (DSD_KERNELS_TILE_GEMM=1: on this process's capability, the
    portable default build included) and once with the ATen matmuls."""
    monkeypatch.setenv("DSD_KERNELS_TILE_GEMM", "1" if request.param == "tile_gemm" else "0")
    assert OPS.masked_linear_tile_kernel() == (CAPABILITY if request.param == "tile_gemm" else "aten")
    from dsd_kernels._backend import cpp_tile_kernel  # what `dsd-kernels info` prints
    assert cpp_tile_kernel().startswith("tile_gemm" if request.param == "tile_gemm" else "ATen matmuls")
    return request.param


def products(x, w, dy, keep, bias=None):
    """y, dX, dW with every tile multiplied, in float64."""
    wm = (w * keep).double()
    y = F.linear(x.double(), wm, None if bias is None else bias.double())
    return y, dy.double() @ wm, (dy.double().t() @ x.double()) * keep


def run(x, w, dy, keep, bias=None):
    words = dk.Mask.from_bool(keep).packed
    kept = tile_structure(words, *w.shape).kept  # the tiled path, whatever the kept fraction
    y = OPS.masked_linear_forward(x, w, words, bias, kept)
    dx, dw = OPS.masked_linear_backward(dy, x, w, words, True, True, kept)
    return y, dx, dw


def block_keep(N, K, kept_fraction, gen):
    tiles = torch.rand(-(-N // 64), -(-K // 64), generator=gen) < kept_fraction
    inside = torch.rand(N, K, generator=gen) > 0.3
    return tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:N, :K] & inside


@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 300])  # register tiles of 6 rows; dW slices of 256 rows
@pytest.mark.parametrize("K,N", [(1, 1), (31, 33), (64, 64), (65, 130), (200, 150), (129, 257)])
def test_matches_float64_products(kernel, M, K, N):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x, w, dy = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(M, N, generator=gen)
    bias = torch.randn(N, generator=gen) if M % 2 else None
    keep = block_keep(N, K, 0.6, gen)
    bias_before = None if bias is None else bias.clone()
    for got, want in zip(run(x, w, dy, keep, bias), products(x, w, dy, keep, bias_before)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    if bias is not None:  # the output starts from a copy of the bias, never the bias itself
        assert torch.equal(bias, bias_before)


@pytest.mark.parametrize("kept_fraction", [0.0, 1.0])
def test_no_tile_and_every_tile_kept(kernel, kept_fraction):
    gen = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(20, 130, generator=gen), torch.randn(70, 130, generator=gen), torch.randn(20, 70, generator=gen)
    bias = torch.randn(70, generator=gen)
    keep = block_keep(70, 130, kept_fraction, gen)
    y, dx, dw = run(x, w, dy, keep, bias)
    for got, want in zip((y, dx, dw), products(x, w, dy, keep, bias)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    if kept_fraction == 0.0:
        assert torch.equal(y, bias.expand(20, 70)) and dx.eq(0).all() and dw.eq(0).all()


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count(kernel, threads):
    """The row chunks, k-tile shares and slices are cut per thread count: 1 and 3 threads (the
    suite otherwise runs with this machine's count) give the same products."""
    gen = torch.Generator().manual_seed(5)
    x, w, dy = torch.randn(301, 200, generator=gen), torch.randn(150, 200, generator=gen), torch.randn(301, 150, generator=gen)
    keep = block_keep(150, 200, 0.6, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = run(x, w, dy, keep)
    finally:
        torch.set_num_threads(before)
    for g, want in zip(got, products(x, w, dy, keep)):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-4)


def test_the_two_kernels_agree_on_the_bench_shape(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, w, dy = torch.randn(512, 1024, generator=gen), torch.randn(1024, 1024, generator=gen), torch.randn(512, 1024, generator=gen)
    keep = dk.magnitude_masks(w, 0.75, block=(64, 64))[0].to_bool()
    monkeypatch.setenv("DSD_KERNELS_TILE_GEMM", "1")
    ours = run(x, w, dy, keep)
    monkeypatch.setenv("DSD_KERNELS_TILE_GEMM", "0")
    aten = run(x, w, dy, keep)
    for a, b in zip(ours, aten):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("M", [9, 3])  # 3: the few-rows kernels
def test_pruned_weights_and_gradients_stay_out(kernel, M):
    """NaN stored in pruned weights inside kept tiles never reaches y or dX; dW is exactly +0
    where pruned even where the product there is NaN; inf in inputs that meet only skipped tiles
    changes nothing."""
    gen = torch.Generator().manual_seed(3)
    K, N = 192, 130
    x, w, dy = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(M, N, generator=gen)
    keep = torch.zeros(N, K, dtype=torch.bool)
    keep[:64, :128] = torch.rand(64, 128, generator=gen) > 0.5  # k-tiles 0-1 of n-tile 0 only
    w_nan = w.masked_fill(~keep, float("nan"))
    x_inf = x.clone()
    x_inf[:, 128:] = float("inf")  # k-tile 2: no kept tile, so never multiplied, not even for dW
    dy_inf = dy.clone()
    dy_inf[:, 64:] = float("inf")  # n-tiles 1-2: no kept tile
    y, dx, dw = run(x_inf, w_nan, dy_inf, keep)
    want_y, want_dx, want_dw = products(x, w, dy, keep)
    torch.testing.assert_close(y[:, :64].double(), want_y[:, :64], rtol=1e-5, atol=1e-4)
    assert y[:, 64:].eq(0).all()
    torch.testing.assert_close(dx[:, :128].double(), want_dx[:, :128], rtol=1e-5, atol=1e-4)
    assert dx[:, 128:].eq(0).all()
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-4)
    assert dw[~keep].eq(0).all() and not dw[~keep].signbit().any()
    x_nan = x.clone()
    x_nan[0, 5] = float("nan")  # meets kept tiles: NaN in dW's row kept entries, +0 where pruned
    _, _, dw = run(x_nan, w, dy, keep)
    assert dw[~keep].eq(0).all() and not dw[~keep].signbit().any()
    assert dw[:64, 5][keep[:64, 5]].isnan().all()


def test_non_float32_takes_the_aten_matmuls():
    gen = torch.Generator().manual_seed(4)
    x, w, dy = (torch.randn(7, 130, generator=gen, dtype=torch.float64), torch.randn(70, 130, generator=gen, dtype=torch.float64),
                torch.randn(7, 70, generator=gen, dtype=torch.float64))
    keep = block_keep(70, 130, 0.5, gen)
    for got, want in zip(run(x, w, dy, keep), products(x, w, dy, keep)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])  # at most 4: the few-rows kernels; 5: the others
@pytest.mark.parametrize("K,N", [(1, 1), (31, 33), (65, 130), (200, 150)])
@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "unstructured"])
def test_few_rows_match_float64_products(kernel, M, K, N, tiled):
    """Decode-like batches: forward and dX read W and its mask directly (tiled: skipping empty
    tiles; unstructured: no grid), dW as before; NaN in pruned weights stays out."""
    gen = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    x, w, dy = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(M, N, generator=gen)
    bias = torch.randn(N, generator=gen) if M % 2 else None
    keep = block_keep(N, K, 0.6, gen) if tiled else torch.rand(N, K, generator=gen) > 0.5
    w_poisoned = w.masked_fill(~keep, float("nan"))
    words = dk.Mask.from_bool(keep).packed
    kept = tile_structure(words, N, K).kept if tiled else None
    y = OPS.masked_linear_forward(x, w_poisoned, words, bias, kept)
    dx, dw = OPS.masked_linear_backward(dy, x, w_poisoned, words, True, True, kept)
    for got, want in zip((y, dx, dw), products(x, w, dy, keep, bias)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_few_rows_through_the_op_match_the_reference():
    """The cpp adapter sends 1-4 rows of fp32 with unstructured masks to the few-rows kernels
    (where tile_gemm runs: AVX2 and AVX-512; oneDNN on W*M otherwise), forward and backward."""
    from dsd_kernels import reference as R
    gen = torch.Generator().manual_seed(3)
    for M in (1, 4, 9):
        x = torch.randn(M, 300, generator=gen, requires_grad=True)
        w = torch.randn(200, 300, generator=gen, requires_grad=True)
        keep = torch.rand(200, 300, generator=gen) > 0.5
        with dk.use_backend("cpp"):
            y = dk.ops.masked_linear(x, w, dk.Mask.from_bool(keep))
        dy = torch.randn_like(y)
        got = (y, *torch.autograd.grad(y, (x, w), dy))
        y_ref = R.masked_linear(x, w, keep)
        want = (y_ref, *torch.autograd.grad(y_ref, (x, w), dy))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
