"""masked_linear, MaskedLinear, sparsify and block pruning against F.linear(x, W*M, b)."""
import io

import pytest
import torch
import torch.nn.functional as F

import dsd_kernels as dk
from dsd_kernels import ops
from dsd_kernels import reference as R
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.nn import MaskedLinear, sparsify

from ._helpers.interpreter import require_interpreter_feature
from .conftest import DEVICE

try:
    from dsd_kernels.backends.triton.masked_linear import ROW_CONFIGS as TRITON_ROW_CONFIGS
except ImportError:  # no triton here: the Triton tests skip
    TRITON_ROW_CONFIGS = ()

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=2e-2, atol=1.5e-1)}
SHAPES = [(1, 7, 33), (7, 33, 130), (33, 130, 7), (130, 1023, 33), (5, 64, 64)]  # tokens, in, out


@pytest.fixture(autouse=True)
def _triton_interpreter_can_loop(request):
    """masked_linear's Triton kernels loop over the kept tiles' bounds read with tl.load."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton":
        require_interpreter_feature("loaded_range")


def case(tokens, d_in, d_out, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, tokens, d_in, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(d_out, d_in, generator=g).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(d_out, generator=g).to(dtype).to(DEVICE).requires_grad_()
    keep = (torch.rand(d_out, d_in, generator=g) > 0.5).to(DEVICE)
    return x, w, b, keep


def check_against_reference(x, w, b, keep, mask):
    y = ops.masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), grad)
    y_ref = R.masked_linear(x, w, keep, b)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, w, b), grad)
    tol = TOL[x.dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)
    torch.testing.assert_close(db, db_ref, **tol)
    assert dw[~keep].eq(0).all(), "dW must be exactly zero where pruned"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    x, w, b, keep = case(*shape, dtype)
    check_against_reference(x, w, b, keep, dk.Mask.from_bool(keep))


def test_3d_input_bool_mask_and_no_bias(backend):
    x, w, b, keep = case(9, 40, 70, torch.float32, lead=(3,))
    check_against_reference(x, w, b, keep, keep)
    y = ops.masked_linear(x, w, keep)
    torch.testing.assert_close(y, F.linear(x, w * keep), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_block_sparse_matches_reference(backend, dtype):
    x, w, b, keep = case(70, 200, 150, dtype)
    mask = dk.magnitude_masks(w, 0.75, block=(64, 64))[0]
    check_against_reference(x, w, b, mask.to_bool(), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_row_block_sparse_leaves_the_bias_alone(backend, dtype):
    """Decoding one token through a block-pruned layer: the output starts from the bias, and the
    bias itself must not change (a one-row expand of it is contiguous, so a kernel that
    accumulates into expand(bias).contiguous() would write into the bias)."""
    x, w, b, _ = case(1, 200, 150, dtype)
    mask = dk.magnitude_masks(w.detach(), 0.75, block=(64, 64))[0]
    before = b.detach().clone()
    for _ in range(2):
        y = ops.masked_linear(x.detach(), w.detach(), mask, b.detach())
        torch.testing.assert_close(y, R.masked_linear(x, w, mask.to_bool(), before).detach(), **TOL[dtype])
    assert torch.equal(b.detach(), before)


def test_empty_tiles_are_skipped(backend):
    """A skipped tile is never multiplied: inf in the inputs it would meet stays out of the result.
    W*M is 0 in a pruned tile, and 0 * inf = NaN, so a backend that multiplies pruned tiles (the
    dense way, F.linear(x, W*M)) returns NaN where one that skips them returns finite values.
    Every backend skips tiles except the torch composite on a GPU (the declared fallback there:
    one dense matmul on W*M), which must then give exactly F.linear(x, W*M)'s result, NaN included."""
    x, w, b, _ = case(70, 200, 150, torch.float32)
    keep = torch.zeros(150, 200, dtype=torch.bool, device=DEVICE)
    keep[:64, :64] = torch.rand(64, 64, device=DEVICE) > 0.3  # 1 of 3 x 4 tiles keeps anything
    x = x.detach().clone()
    x[:, 64:] = float("inf")  # meets only the empty k-tiles 1..3
    x.requires_grad_()
    y = ops.masked_linear(x, w, keep, b)
    dense = torch.nn.functional.linear(x.detach(), w.detach() * keep, b.detach())
    assert torch.isnan(dense).any()  # dense: NaN
    if backend == "torch" and DEVICE != "cpu":
        torch.testing.assert_close(y.detach(), dense, equal_nan=True)
        return
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, R.masked_linear(x[:, :64], w[:, :64], keep[:, :64], b), **TOL[torch.float32])
    grad = torch.randn_like(y)
    grad[:, 64:] = float("inf")  # dX = dY @ (W*M) meets it only in the empty n-tiles 1..2
    dx, = torch.autograd.grad(y, (x,), grad)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx[:, :64], grad[:, :64] @ (w * keep)[:64, :64], **TOL[torch.float32])
    assert dx[:, 64:].eq(0).all()


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
def test_no_input_rows_or_no_in_features_give_the_bias(backend, lead):
    for tokens, d_in in ((0, 9), (4, 0)):
        x = torch.randn(*lead[:-1], tokens, d_in, device=DEVICE, requires_grad=True)
        w = torch.randn(5, d_in, device=DEVICE, requires_grad=True)
        b = torch.randn(5, device=DEVICE, requires_grad=True)
        keep = torch.ones(5, d_in, dtype=torch.bool, device=DEVICE)
        y = ops.masked_linear(x, w, keep, b)
        want = F.linear(x, w, b)
        torch.testing.assert_close(y, want)
        grads = torch.autograd.grad(y.sum(), (x, w, b))
        want_grads = torch.autograd.grad(want.sum(), (x, w, b))
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got, ref)
        torch.testing.assert_close(ops.masked_linear(x, w, keep), F.linear(x, w))


def test_direct_op_call_checks_its_inputs_like_the_wrapper():
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    words = dk.Mask.from_bool(torch.ones(5, 40, dtype=torch.bool)).packed
    with pytest.raises(ValueError, match=r"mask_words \(\(5, 1\), torch.int32, cpu\) does not fit weight "
                                         r"\(5, 40\): expected int32 \(5, 2\)"):
        torch.ops.dsd_kernels.masked_linear(x, w, words[:, :1], None)
    with pytest.raises(ValueError, match="weight expects in_features=40"):
        torch.ops.dsd_kernels.masked_linear(x[:, :7], w, words, None)
    with pytest.raises(TypeError, match="one float dtype"):
        torch.ops.dsd_kernels.masked_linear(x.double(), w, words, None)
    from torch._subclasses.fake_tensor import FakeTensorMode
    short = words[:, :1].clone()
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="does not fit weight"):
        torch.ops.dsd_kernels.masked_linear(mode.from_tensor(x), mode.from_tensor(w),
                                            mode.from_tensor(short), None)


def test_gradcheck_float64():
    x, w, b, keep = case(3, 9, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.masked_linear(x, w, keep, b), (x, w, b))


def test_opcheck():
    x, w, b, keep = case(6, 40, 20, torch.float32)
    words = dk.Mask.from_bool(keep).packed.to(DEVICE)
    args = (x.detach().requires_grad_(), w.detach().requires_grad_(), words, b.detach().requires_grad_())
    torch.library.opcheck(torch.ops.dsd_kernels.masked_linear.default, args)
    torch.library.opcheck(torch.ops.dsd_kernels.masked_linear.default, (args[0], args[1], words, None))
    g = torch.randn(6, 20, device=DEVICE)
    torch.library.opcheck(torch.ops.dsd_kernels.masked_linear_backward.default,
                          (g, x.detach(), w.detach(), words, True, True, True))


def test_torch_compile_fullgraph_model():
    torch.manual_seed(0)
    model = sparsify(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)), 0.5)
    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)  # inductor: the real thing, ~7 s cold
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert model[0].weight.grad[~model[0].mask.to_bool()].eq(0).all()


def test_masked_linear_module_state_dict_round_trip_and_repr():
    lin = torch.nn.Linear(20, 10)
    m = MaskedLinear.from_linear(lin, torch.rand(10, 20) > 0.3)
    assert m.weight is lin.weight
    assert "sparsity=" in repr(m)
    assert m.weight[~m.mask.to_bool()].eq(0).all()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = MaskedLinear(20, 10)
    assert fresh.mask is None and "mask_words" not in fresh.state_dict()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.mask == m.mask
    x = torch.randn(3, 20)
    assert torch.equal(fresh(x), m(x))
    m.set_mask(None)
    fresh.load_state_dict(m.state_dict())
    assert fresh.mask is None
    bad = {**MaskedLinear(20, 10, mask=torch.ones(10, 20, dtype=torch.bool)).state_dict(),
           "mask_words": torch.zeros(3, 3, dtype=torch.int32)}
    with pytest.raises(RuntimeError, match="does not fit weight"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD, torch.optim.AdamW])
def test_any_optimizer_trains_a_sparse_model(optimizer):
    torch.manual_seed(0)
    model = sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)),
                     0.6, block=(4, 4))
    opt = optimizer(model.parameters(), lr=0.05, weight_decay=1e-2)
    pruned = [~m.mask.to_bool() for m in (model[0], model[2])]
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(32, 8)).pow(2).mean().backward()
        opt.step()
    for m, where in zip((model[0], model[2]), pruned):
        assert m.weight[where].eq(0).all()


def test_dsd_scheduler_with_masked_linear_and_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MaskedLinear(8, 16), torch.nn.ReLU(), MaskedLinear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dsd = DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5, model=model)

    def epoch():
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()

    epoch()
    assert dsd.step() == "sparse"
    pruned = ~model[0].mask.to_bool()
    assert opt.state[model[0].weight]["exp_avg"][pruned].eq(0).all()
    epoch()
    assert model[0].weight[pruned].eq(0).all() and int(pruned.sum()) == 64
    assert dsd.step() == "redense"
    assert model[0].mask is None and model[0].weight[pruned].eq(0).all()
    assert opt.param_groups[0]["lr"] == 0.01 and dsd.lr_scale == pytest.approx(0.1)  # steps at 0.001
    epoch()
    assert (model[0].weight[pruned] != 0).any()


def test_block_pruning_exact_tile_count_and_ties():
    w = torch.ones(8, 8)
    keep = dk.magnitude_masks(w, 0.5, block=(4, 4))[0].to_bool()
    # 4 equal tiles: the first two in row-major order are pruned
    assert keep[:4, :].eq(False).all() and keep[4:, :].all()
    w = torch.randn(130, 70)
    m = dk.magnitude_masks([w, torch.randn(128, 128)], [0.5, 0.25], block=(64, 64))
    assert m[1].count() == 3 * 64 * 64
    for bad in [(0, 4), (4,), "64", (4.0, 4), (True, 4)]:
        with pytest.raises(ValueError, match="block"):
            dk.magnitude_masks(w, 0.5, block=bad)


def test_sparsify_replaces_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 8)),
                                torch.nn.Conv1d(1, 1, 3))
    sparsify(model, [0.25, 0.5])
    assert isinstance(model[0], MaskedLinear) and isinstance(model[1][0], MaskedLinear)
    assert model[0].mask.sparsity == 0.25 and model[1][0].mask.sparsity == 0.5
    assert isinstance(model[2], torch.nn.Conv1d)
    single = sparsify(torch.nn.Linear(4, 4), 0.5)
    assert isinstance(single, MaskedLinear)


def test_bad_input():
    x, w, b, keep = case(4, 10, 6, torch.float32)
    with pytest.raises(ValueError, match="in_features=10"):
        ops.masked_linear(torch.randn(4, 11), w, keep, b)
    with pytest.raises(ValueError, match=r"masks?.*shape"):
        ops.masked_linear(x, w, torch.ones(10, 6, dtype=torch.bool), b)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        ops.masked_linear(x, w, keep, torch.randn(7))
    with pytest.raises(TypeError, match="x is torch.float64 but weight is torch.float32"):
        ops.masked_linear(x.double(), w, keep, b)
    with pytest.raises(TypeError, match="bias is torch.float64"):
        ops.masked_linear(x, w, keep, b.double())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.masked_linear(x, w[0], keep, b)
    with pytest.raises(ValueError, match="on meta"):
        ops.masked_linear(x.to("meta"), w, keep, b)
    with pytest.raises(TypeError, match="floating"):
        ops.masked_linear(x.long(), w, keep, b)
    with pytest.raises(ValueError, match=r"packed words\) has shape"):
        ops.masked_linear(x, w, torch.zeros(6, 2, dtype=torch.int32), b)


def test_cpp_kernel_checks_the_tile_grid_it_is_given():
    if "cpp" not in dk.available_backends():
        pytest.skip("C++ extension not built")
    w = torch.randn(70, 130)
    words = dk.Mask.from_bool(torch.rand(70, 130) > 0.5).packed
    with pytest.raises(RuntimeError, match=r"tile_kept must be contiguous int32 of shape \(2, 3\)"):
        torch.ops.dsd_kernels_cpp.masked_linear_forward(torch.randn(4, 130), w, words, None,
                                                        torch.ones(3, 2, dtype=torch.int32))


def test_sparsify_gives_sparsities_in_named_modules_order():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MaskedLinear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.ReLU(), MaskedLinear(16, 4)).to(DEVICE)
    sparsify(model, [0.25, 0.5, 0.75])
    assert [round(m.sparsity, 4) for m in (model[0], model[2], model[4])] == [0.25, 0.5, 0.75]


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
def test_triton_configuration_follows_torch_and_the_batch():
    """fp32 takes exact products unless torch allows TF32 in matmuls (as F.linear); decode-like
    batches take 16-row programs on 4 warps; before sm_90 no software pipelining (the configs
    tests/test_aot.py compiles without spills)."""
    from dsd_kernels.backends.triton import masked_linear as L
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert L.use_ieee(torch.float32) and not L.use_ieee(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert not L.use_ieee(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert L.reduction_step(True) == 16 and L.reduction_step(False) == 32
    assert [L.block_m_for(m) for m in (1, 16, 17, 4096)] == [16, 16, 64, 64]
    assert L.launch_options((8, 0), 64) == {"num_warps": 8, "num_stages": 1}
    assert L.launch_options((9, 0), 16) == {"num_warps": 4, "num_stages": 3}


def test_autotuning_candidates_per_batch_class_and_switch(monkeypatch):
    """Decode-like batches have one candidate (the static choice: nothing to tune); larger ones
    the two largest programs that fit the batch; exact fp32 never the 128-row programs that
    spill; DSD_KERNELS_AUTOTUNE=0 keeps the static choice on a GPU, =1 tunes under the interpreter."""
    from dsd_kernels.backends.triton import masked_linear as L
    assert [L.rows_class(m) for m in (0, 1, 16, 17, 33, 200, 4096)] == [16, 16, 16, 32, 64, 256, 256]
    assert L.row_configs_for(1, False) == ((16, 4),)
    assert L.row_configs_for(20, False) == ((16, 4), (32, 8))
    assert L.row_configs_for(4096, False) == ((64, 8), (128, 8))
    assert L.row_configs_for(4096, True) == ((32, 8), (64, 8))
    statics = {(L.block_m_for(m), L.launch_options((9, 0), L.block_m_for(m))["num_warps"]) for m in (1, 4096)}
    assert statics <= set(L.ROW_CONFIGS) and L.NUM_WARPS in L.GRAD_WEIGHT_WARPS
    monkeypatch.delenv("DSD_KERNELS_AUTOTUNE", raising=False)
    assert L.autotune_enabled(torch.device("cuda")) and not L.autotune_enabled(torch.device("cpu"))
    monkeypatch.setenv("DSD_KERNELS_AUTOTUNE", "0")
    assert not L.autotune_enabled(torch.device("cuda"))
    monkeypatch.setenv("DSD_KERNELS_AUTOTUNE", "1")
    assert L.autotune_enabled(torch.device("cpu"))
    assert L.tuned_kernel("forward", torch.device("cpu"), 8, False) is None  # one candidate


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autotuned_launches_match_the_reference(monkeypatch, dtype):
    require_interpreter_feature("loaded_range")
    """The autotuned path (what a GPU runs by default) under the interpreter, every candidate
    timed by wall clock: each kernel keeps one of its candidates, gives the reference's results,
    and counts as one launch per call."""
    from dsd_kernels.backends.triton import _tiles
    from dsd_kernels.backends.triton import masked_linear as L
    monkeypatch.setenv("DSD_KERNELS_AUTOTUNE", "1")
    for tokens in (20, 200):  # batch classes 32 and 256: two candidates each
        x, w, b, _ = case(tokens, 130, 70, dtype, seed=tokens)
        mask = dk.magnitude_masks(w, 0.5, block=(64, 64))[0]
        before = dict(_tiles.LAUNCHES)
        with dk.use_backend("triton"):
            check_against_reference(x, w, b, mask.to_bool(), mask)
        launched = {k: v - before.get(k, 0) for k, v in _tiles.LAUNCHES.items()}
        assert {k: v for k, v in launched.items() if v} == {
            "_forward_kernel": 1, "_grad_input_kernel": 1, "_grad_weight_kernel": 1}
        ieee = L.use_ieee(dtype)
        for name in ("forward", "grad_input", "grad_weight"):
            tuner = L.tuned_kernel(name, x.device, tokens, ieee)
            assert tuner is not None and tuner.best_config in tuner.configs
        rows = {c.kwargs["BLOCK_M"] for c in L.tuned_kernel("forward", x.device, tokens, ieee).configs}
        assert rows == {m for m, _ in L.row_configs_for(tokens, ieee)}


@pytest.mark.skipif("triton" not in dk.available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("block_m", sorted({m for m, _ in TRITON_ROW_CONFIGS}))
def test_every_autotuning_row_count_matches_the_reference(monkeypatch, block_m):
    require_interpreter_feature("loaded_range")
    """Each program height autotuning may pick, launched alone (static path), on a batch that
    leaves a partial last program and on one smaller than a program."""
    from dsd_kernels.backends.triton import masked_linear as L
    monkeypatch.setenv("DSD_KERNELS_AUTOTUNE", "0")
    monkeypatch.setattr(L, "block_m_for", lambda M: block_m)
    for tokens in (block_m + 3, 5):
        x, w, b, _ = case(tokens, 130, 70, torch.float32, seed=block_m + tokens)
        mask = dk.magnitude_masks(w, 0.5, block=(64, 64))[0]
        with dk.use_backend("triton"):
            check_against_reference(x, w, b, mask.to_bool(), mask)


def test_expanded_bias_is_read_as_its_values(backend):
    """A bias with shared elements (expand) is its logical values on every path (oneDNN's linear
    read such a bias as dense memory)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3, 1, generator=g), torch.randn(3, 1, generator=g)
    bias = torch.randn(1, generator=g).expand(3)
    mask = torch.ones(3, 1, dtype=torch.bool)
    torch.testing.assert_close(dk.masked_linear(x, w, mask, bias), torch.nn.functional.linear(x, w, bias))
