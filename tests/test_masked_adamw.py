"""ops.masked_adamw_ on every backend present against reference/ and torch.optim.AdamW: the kept
weights carry AdamW's bits (fp32, fp64), the pruned weights and moments are exactly +0 whatever
the gradient held there (NaN, inf), on adversarial shapes and layouts."""
import itertools

import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import _backend, ops
from dsd_kernels.optim.masked_adamw import _reference_masked_adamw_ as reference_masked_adamw_
from dsd_kernels.masks import Mask

from .conftest import require_backend

# the backends with a masked_adamw row on CPU (no Triton kernel: on CUDA the composite serves)
BACKENDS = list(dict.fromkeys(r.backend for r in _backend.rows_for("masked_adamw", "cpu") if r.auto))


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param

OPTIONS = [dict(weight_decay=wd, amsgrad=a, maximize=mx, beta1=b1)
           for wd, a, mx, b1 in itertools.product([0.0, 1e-2], [False, True], [False, True], [0.9, 0.3])]
SHAPES = [(33, 70), (17,), (4, 3, 3, 3), (1,), (0, 5), (3, 32), (2, 33), (300, 64), (64,)]  # rows of whole words: in one block and several


def bits(t):
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.contiguous().view({4: torch.int32, 8: torch.int64}[t.element_size()])


def make_state(dtype, seed=0, shapes=SHAPES, keep_rate=0.5):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    keeps = [(torch.rand(s, generator=g) < keep_rate) if len(s) >= 2 else None for s in shapes]
    return params, keeps


def grads_for(params, step, keeps=None, poison=False):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if poison and keeps is not None and keeps[i] is not None:  # garbage where pruned: never read
            grad = torch.where(keeps[i], grad, torch.full_like(grad, float("nan")))
            grad.view(-1)[:1][~keeps[i].view(-1)[:1]] = float("inf")
        out.append(grad)
    return out


def run(params, keeps, steps, *, backend=None, reference=False, poison=False, **opts):
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    counts = [torch.tensor(0.0) for _ in params]
    masks = [None if k is None else Mask.from_bool(k) for k in keeps]
    for step in range(steps):
        grads = grads_for(params, step, keeps, poison)
        if reference:
            reference_masked_adamw_(params, grads, m, v, vmax, counts, masks, lr=1e-2, **opts)
        else:
            with dk.use_backend(backend):
                ops.masked_adamw_(params, grads, m, v, vmax, counts, masks, lr=1e-2, **opts)
    return params, m, v, vmax, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_the_reference_bit_for_bit(backend, dtype, opts):
    params, keeps = make_state(dtype)
    ours = run(params, keeps, 4, backend=backend, poison=True, **opts)
    want = run(params, keeps, 4, reference=True, poison=True, **opts)
    for a_list, b_list in zip(ours[:3] + ((ours[3],) if opts["amsgrad"] else ()), want):
        for a, b in zip(a_list, b_list):
            assert torch.equal(bits(a), bits(b))
    assert [c.item() for c in ours[4]] == [4.0] * len(params)


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dense_is_torch_adamw_and_pruned_entries_are_plus_zero(backend, opts):
    params, keeps = make_state(torch.float32, seed=3)
    dense = run(params, [None] * len(params), 3, backend=backend, **opts)
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(opts["beta1"], 0.999), weight_decay=opts["weight_decay"],
                            amsgrad=opts["amsgrad"], maximize=opts["maximize"])
    for step in range(3):
        for q, g in zip(theirs, grads_for(params, step)):
            q.grad = g
        opt.step()
    for a, q in zip(dense[0], theirs):
        assert torch.equal(bits(a), bits(q.detach()))
    masked = run(params, keeps, 3, backend=backend, poison=True, **opts)
    for tensors in masked[:3]:
        for t, keep in zip(tensors, keeps):
            if keep is not None:
                assert torch.equal(bits(t)[~keep], torch.zeros_like(bits(t)[~keep]))  # +0, not -0 or NaN


def test_channels_last_and_complex_parameters_step_like_their_contiguous_real_selves():
    g = torch.Generator().manual_seed(5)
    conv = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
    cplx = torch.randn(6, 10, dtype=torch.complex64, generator=g)
    keep_conv, keep_cplx = torch.rand(conv.shape, generator=g) > 0.5, torch.rand(cplx.shape, generator=g) > 0.5
    results = []
    for layout in ("as given", "contiguous real"):
        p1 = conv.clone(memory_format=torch.preserve_format) if layout == "as given" else conv.contiguous()
        p2 = cplx.clone() if layout == "as given" else torch.view_as_real(cplx).clone()
        k2 = keep_cplx if layout == "as given" else keep_cplx.unsqueeze(-1).expand(6, 10, 2).contiguous()
        state = [[torch.zeros_like(p) for p in (p1, p2)] for _ in range(2)]
        steps = [torch.tensor(0.0), torch.tensor(0.0)]
        for step in range(3):
            g1 = torch.randn(conv.shape, generator=torch.Generator().manual_seed(step))
            g2 = torch.randn(cplx.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(50 + step))
            g1 = g1.to(memory_format=torch.channels_last) if layout == "as given" else g1
            g2 = g2 if layout == "as given" else torch.view_as_real(g2)
            ops.masked_adamw_([p1, p2], [g1, g2], state[0], state[1], [], steps, [keep_conv, k2], lr=1e-2)
        assert p1.is_contiguous(memory_format=torch.channels_last) == (layout == "as given")
        results.append((p1.contiguous(), torch.view_as_real(p2) if p2.is_complex() else p2))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_torch_fused_variant_is_torch_fused_adamw_then_masks(backend, dtype, options):
    """With torch_fused=True every CPU backend gives the bits of torch's fused AdamW kernel on the
    kept weights (the C++ kernel its own way: one pass, torch's tail rounding included; every
    tail length of the vector loop below; rows of whole mask words, which fp32 steps with the
    words as vector masks where the CPU has AVX-512, in one block, in several, and dense), +0
    where pruned."""
    shapes = [(33, 70), (5, 40), (3, 7), (1, 31), (2, 9), (3, 64), (1, 32), (300, 64), (160,)]
    params, keeps = make_state(dtype, seed=7, shapes=shapes)
    ours = run(params, keeps, 3, backend=backend, poison=True, torch_fused=True, **options)
    keeps = [torch.ones(p.shape, dtype=torch.bool) if k is None else k for p, k in zip(params, keeps)]
    beta1 = options["beta1"]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, fused=True, betas=(beta1, 0.999),
                            **{k: v for k, v in options.items() if k != "beta1"})
    for step in range(3):
        for q, g, k in zip(theirs, grads_for(params, step, keeps), keeps):
            q.grad = torch.where(k, g, torch.zeros_like(g))
        opt.step()
        with torch.no_grad():
            for q, k in zip(theirs, keeps):
                q.masked_fill_(~k, 0)
    for a, q, k in zip(ours[0], theirs, keeps):
        assert torch.equal(bits(a), bits(q.detach()))
        assert bits(a)[~k].eq(0).all()


def test_the_cpp_kernel_reproduces_torch_fused_here_itself():
    """Where ATen's CPU kernels are AVX-512 or AVX2 builds, the C++ kernel's fused arithmetic
    matches torch's (checked at first use); it must not fall back to torch's own step there, or
    a fault in the kernel would hide behind the fallback. Also under ATen's AVX2 kernels."""
    import subprocess
    import sys

    from dsd_kernels.backends._adamw_steps import fused_layout
    require_backend("cpp")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"):
        pytest.skip(f"ATen's CPU kernels here are {torch.backends.cpu.get_cpu_capability()} builds: "
                    "the fused arithmetic falls back to torch's own step")
    assert fused_layout(torch.float32) is not None and fused_layout(torch.float64) is not None
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        probe = ("import torch, dsd_kernels._C; from dsd_kernels.backends._adamw_steps import fused_layout; "
                 "print(torch.backends.cpu.get_cpu_capability(), fused_layout(torch.float32), "
                 "fused_layout(torch.float64))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("AVX2") and "None" not in out.stdout, out.stdout


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(6, 40, generator=g), torch.randn(7, generator=g)]
    args = (p, [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
            [], [torch.tensor(0.0), torch.tensor(0.0)], [Mask.from_bool(torch.rand(6, 40, generator=g) > 0.5).packed, None],
            1e-3, 0.9, 0.999, 1e-8, 1e-2, False, False, False)
    torch.library.opcheck(torch.ops.dsd_kernels.masked_adamw_.default, args)


@pytest.mark.parametrize("call,error,match", [
    (lambda p, g, s: ops.masked_adamw_(p, g[:1], s, s, [], [torch.tensor(0.0)] * 2, None, lr=1e-3),
     ValueError, "equal lengths"),
    (lambda p, g, s: ops.masked_adamw_(p, g, s, s, [], [torch.tensor(0.0)] * 2, None, lr=1e-3, amsgrad=True),
     ValueError, "amsgrad=True needs 2 max_exp_avg_sqs"),
    (lambda p, g, s: ops.masked_adamw_(p, g, s, s, [], [torch.tensor(0.0)] * 2, None, lr=-1.0),
     ValueError, "Invalid lr"),
    (lambda p, g, s: ops.masked_adamw_(p, g, s, s, [], [torch.tensor(0.0)] * 2, None, lr=1e-3, beta2=1.0),
     ValueError, "Invalid beta2"),
    (lambda p, g, s: ops.masked_adamw_(p, g, s, s, [], [torch.tensor(0.0)] * 2, [torch.ones(3, 3, dtype=torch.bool), None],
                                       lr=1e-3), ValueError, "masks\\[0\\]"),
    (lambda p, g, s: ops.masked_adamw_(p, [g[0].double(), g[1]], s, s, [], [torch.tensor(0.0)] * 2, None, lr=1e-3),
     ValueError, "grads\\[0\\]"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    params = [torch.randn(4, 40), torch.randn(3)]
    grads = [torch.randn_like(p) for p in params]
    state = [torch.zeros_like(p) for p in params]
    with pytest.raises(error, match=match):
        call(params, grads, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_takes_the_composite_with_torch_bits(dtype):
    params, keeps = make_state(dtype, seed=9, shapes=[(6, 40), (9,)])
    ours = run(params, [None, None], 2, backend=None)  # auto: the C++ row serves fp32/fp64 only
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, foreach=True)
    for step in range(2):
        for q, g in zip(theirs, grads_for(params, step)):
            q.grad = g
        opt.step()
    for a, q in zip(ours[0], theirs):
        assert torch.equal(a.view(torch.int16), q.detach().view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("opts", OPTIONS[::2], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("rounding", ["cpu", "cuda"])
def test_triton_kernel_matches_the_reference(dtype, opts, rounding, monkeypatch):
    """The GPU path's Triton kernel, under the interpreter on CPU, in both of its roundings
    (torch's CPU and CUDA foreach orders of addcmul/addcdiv; the CUDA one is checked bit for
    bit against torch on a GPU, tests/test_gpu.py): one launch per dtype, the reference's values
    (the interpreter's numpy rounds sqrt as IEEE, torch's CPU sqrt as MKL does: equal up to an
    ulp of the denominator), exact +0 where pruned."""
    require_backend("triton")
    from dsd_kernels.backends.triton import masked_adamw as triton_adamw
    from dsd_kernels.backends.triton._tiles import LAUNCHES
    monkeypatch.setattr(triton_adamw, "torch_cuda_rounding", lambda device: rounding == "cuda")
    params, keeps = make_state(dtype, seed=11, shapes=[(9, 70), (5,), (3, 32)])
    before = LAUNCHES["_masked_adamw_kernel"]
    ours = run(params, keeps, 3, backend="triton", poison=True, **opts)
    assert LAUNCHES["_masked_adamw_kernel"] - before == 3  # one per step: one dtype
    want = run(params, keeps, 3, reference=True, poison=True, **opts)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for a_list, b_list in zip(ours[:3], want[:3]):
        for a, b, keep in zip(a_list, b_list, keeps):
            torch.testing.assert_close(a, b, **tol)
            if keep is not None:
                assert torch.equal(bits(a)[~keep], torch.zeros_like(bits(a)[~keep]))


def garbage_where_pruned(t, keep, gen):
    """t with NaN, inf, -0.0 or 1.0 where pruned: what a pruned entry must never leak."""
    junk = torch.tensor([float("nan"), float("inf"), -0.0, 1.0], dtype=t.dtype)
    return torch.where(keep, t, junk[torch.randint(0, 4, t.shape, generator=gen)])


def block_keep(shape, gen):
    """Whole 64x64 tiles kept or pruned (some rows wholly pruned), unstructured inside kept tiles:
    runs of mask words that keep nothing, across rows and in partial words."""
    tiles = torch.rand(-(-shape[0] // 64), -(-shape[1] // 64), generator=gen) < 0.4
    keep = tiles.repeat_interleave(64, 0).repeat_interleave(64, 1)[:shape[0], :shape[1]]
    keep = keep & (torch.rand(shape, generator=gen) > 0.2)
    keep[1] = False
    return keep


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shape", [(130, 200), (70, 100), (256, 96)])
def test_words_that_keep_nothing_are_cleared_and_the_rest_stepped(backend, shape, amsgrad):
    """Pruned blocks are only cleared, never stepped: the weight, moments (and max) there become
    exactly +0 whatever they held; the kept entries carry the reference's bits."""
    gen = torch.Generator().manual_seed(sum(shape))
    keep = block_keep(shape, gen)
    p = garbage_where_pruned(torch.randn(shape, generator=gen), keep, gen)
    m = garbage_where_pruned(0.1 * torch.randn(shape, generator=gen), keep, gen)
    v = garbage_where_pruned(0.01 * torch.rand(shape, generator=gen), keep, gen)
    vmax = garbage_where_pruned(0.02 * torch.rand(shape, generator=gen), keep, gen)
    grad = garbage_where_pruned(torch.randn(shape, generator=gen), keep, gen)
    results = []
    for step in (reference_masked_adamw_, None):
        state = [[t.clone()] for t in (p, m, v, vmax)]
        counts = [torch.tensor(3.0)]
        kwargs = dict(lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad)
        if step is None:
            with dk.use_backend(backend):
                ops.masked_adamw_(state[0], [grad.clone()], state[1], state[2], state[3], counts,
                                  [Mask.from_bool(keep)], **kwargs)
        else:
            step(state[0], [grad.clone()], state[1], state[2], state[3], counts, [Mask.from_bool(keep)], **kwargs)
        results.append([s[0] for s in state])
    for name, ours, want in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), results[1], results[0]):
        if name == "max_exp_avg_sq" and not amsgrad:
            continue
        assert torch.equal(bits(ours), bits(want)), name
        assert bits(ours)[~keep].eq(0).all(), name


def same_bits_or_both_nan(a, b):
    """Equal bits, or NaN in both (torch's kernels do not all keep a NaN's payload)."""
    return bool(((bits(a) == bits(b)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("torch_fused", [False, True], ids=["foreach-bits", "fused-bits"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(8, 64), (300, 32), (5, 40)])  # whole words (one block, several), partial words
def test_non_finite_kept_entries_step_as_torch_steps_them(backend, shape, maximize, torch_fused):
    """NaN and inf where kept (in the gradient, both moments and the amsgrad maximum, including
    a NaN maximum against a finite moment and the reverse): the vector loops give what the
    reference (or torch's fused AdamW, for its bits) gives there, element for element."""
    gen = torch.Generator().manual_seed(shape[0] + 7 * maximize)
    keep = torch.rand(shape, generator=gen) > 0.3
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])

    def poisoned(t):
        at = torch.rand(shape, generator=gen) < 0.15
        return torch.where(at, specials[torch.randint(0, 5, shape, generator=gen)], t)

    p = poisoned(torch.randn(shape, generator=gen))
    grad = poisoned(torch.randn(shape, generator=gen))
    m = poisoned(0.1 * torch.randn(shape, generator=gen))
    v = poisoned(0.01 * torch.rand(shape, generator=gen)).abs()
    vmax = poisoned(0.01 * torch.rand(shape, generator=gen)).abs()
    kwargs = dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=maximize)
    results = []
    for which in ("want", "ours"):
        state = [[t.clone()] for t in (p, m, v, vmax)]
        counts = [torch.tensor(2.0)]
        args = (state[0], [grad.clone()], state[1], state[2], state[3], counts, [Mask.from_bool(keep)])
        if which == "ours":
            with dk.use_backend(backend):
                ops.masked_adamw_(*args, torch_fused=torch_fused, **kwargs)
        elif torch_fused:  # torch's fused AdamW on the kept entries, then +0 where pruned
            with dk.use_backend("torch"):
                ops.masked_adamw_(*args, torch_fused=True, **kwargs)
        else:
            reference_masked_adamw_(*args, **kwargs)
        results.append([s[0] for s in state])
    for name, want, ours in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), *results):
        assert same_bits_or_both_nan(ours, want), name
        assert bits(ours)[~keep].eq(0).all(), name
    assert results[0][0][keep].isnan().any() and results[0][0][keep].isfinite().any()  # the case is adversarial
