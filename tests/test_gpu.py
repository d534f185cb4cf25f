"""GPU-only checks (run on a lent accelerator: `pytest -m gpu`): the compiled Triton kernels and
the CUDA kernels of csrc/cuda (backend "cpp") against reference/, at sizes the CPU interpreter
and the CUDA emulation cannot afford. (The whole suite also runs on CUDA tensors there, per
backend, through the `backend` fixture.)"""
import pytest
import torch

import dsd_kernels as dk
from dsd_kernels import ops
from dsd_kernels import reference as R
from dsd_kernels.app.bench import resnet50_weight_shapes

from .conftest import require_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["triton", "cpp"])
def kernels(request):
    """The GPU kernels under test: Triton, or csrc/cuda (ops that have them)."""
    require_backend(request.param)
    with dk.use_backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    require_backend("triton")
    with dk.use_backend("triton"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_selection_whole_resnet50_matches_reference(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = resnet50_weight_shapes()[::4]
    cpu = [torch.randn(s, generator=g).round(decimals=2).to(dtype) for s in shapes]
    gpu = [t.cuda() for t in cpu]
    sparsities = [0.1 + 0.8 * i / len(shapes) for i in range(len(shapes))]
    got = ops.magnitude_thresholds(gpu, sparsities).cpu()
    want = torch.tensor(R.magnitude_thresholds(cpu, sparsities), dtype=got.dtype)
    assert torch.equal(got, want)
    for m, t, s in zip(ops.magnitude_masks(gpu, sparsities), cpu, sparsities):
        assert torch.equal(m.packed.cpu(), R.pack_bits(R.magnitude_masks([t], [s])[0]))


def test_selection_16m_with_ties_and_nan(kernels):
    w = torch.randn(16 * 2**20, device="cuda").round(decimals=1)
    w[::1000] = float("nan")
    got = ops.magnitude_masks(w, 0.5)[0]
    ref = R.magnitude_masks([w.cpu()], [0.5])[0]
    assert torch.equal(got.to_bool().cpu(), ref)


def test_masked_sgd_matches_reference_on_cuda(kernels):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).cuda() for s in [(1000, 777), (33,), (64, 3, 7, 7)]]
    keeps = [(torch.rand(p.shape, generator=g) > 0.5).cuda() if p.dim() > 1 else None for p in params]
    masks = [dk.Mask.from_bool(k) if k is not None else None for k in keeps]
    ref = [p.clone() for p in params]
    bufs, ref_bufs = [None] * 3, [None] * 3
    for p, q, k in zip(params, ref, keeps):
        if k is not None:
            p.masked_fill_(~k, 0)
            q.masked_fill_(~k, 0)
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g).cuda() for p in params]
        ops.masked_sgd_(params, grads, bufs, masks, **hyper)
        R.masked_sgd_(ref, grads, ref_bufs, keeps, **hyper)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_masked_linear_large_block_sparse(triton_backend, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 1024, generator=g).to(dtype).cuda().requires_grad_()
    w = torch.randn(768, 1024, generator=g).to(dtype).cuda().requires_grad_()
    mask = ops.magnitude_masks(w, 0.75, block=(64, 64))[0]
    y = ops.masked_linear(x, w, mask)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    keep = mask.to_bool().cuda()
    y_ref = R.masked_linear(x.float(), w.float(), keep)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy.float())
    tol = dict(rtol=2e-2, atol=2e-1) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)
    torch.testing.assert_close(dw.float(), dw_ref.float(), **tol)
    assert dw[~keep].eq(0).all()


def test_compile_masked_linear_on_gpu(triton_backend):
    from dsd_kernels.nn import sparsify
    # on the GPU before sparsify: the forced Triton backend selects on CUDA tensors only
    model = sparsify(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                         torch.nn.Linear(512, 64)).cuda(), 0.5)
    x = torch.randn(32, 256, device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-2, atol=1e-2)


def test_selection_over_2_31_elements(kernels):
    # int64 offsets on the device: 2^31 + 33 fp16 weights (4 GiB), the answer known exactly
    n = 2**31 + 33
    w = torch.ones(n, dtype=torch.float16, device="cuda")
    w[-7:] = 0.5
    got = ops.magnitude_masks(w, 10 / n)[0].to_bool()
    assert got[-7:].logical_not().all() and got[:-7].logical_not().sum().item() == 3
    assert got[:3].logical_not().all()  # ties at 1.0: lowest flat index first
    del got, w
    torch.cuda.empty_cache()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_masked_adamw_matches_torch_foreach_adamw_bits_on_cuda(kernels, amsgrad, weight_decay):
    """The Triton and the csrc/cuda AdamW steps on CUDA, bit for bit against
    torch.optim.AdamW(foreach=True), CUDA's default, on the masked gradient (torch's CUDA foreach
    rounding: IEEE sqrt and division, addcmul as v + value * (g * g) and addcdiv as
    p + value * (m / denom), each contracted to one fma). On an H200 the Triton kernel gave 0
    differing elements; the csrc/cuda kernel has not run on a GPU yet. Also printed: how many elements differ from foreach=False, whose CUDA kernels round
    otherwise (MaskedAdamW(foreach=False) on CUDA takes torch's own step for that reason)."""
    from dsd_kernels.optim import MaskedAdamW
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(768, 3072), (3072,), (50, 7, 3, 3), (33, 70)]
    values = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    keeps = [torch.rand(s, generator=g, device="cuda") > 0.5 if len(s) >= 2 else None for s in shapes]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    opt = MaskedAdamW(ours, lr=1e-3, amsgrad=amsgrad, weight_decay=weight_decay)
    opt.set_masks({p: k for p, k in zip(ours, keeps) if k is not None})
    refs = {}
    for foreach in (True, False):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        refs[foreach] = (params, torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad,
                                                   weight_decay=weight_decay, foreach=foreach))
    for step in range(5):
        grads = [torch.randn(s, generator=g, device="cuda") for s in shapes]
        for p, gr in zip(ours, grads):
            p.grad = gr.clone()
        opt.step()
        for params, ref in refs.values():
            for q, gr, k in zip(params, grads, keeps):
                q.grad = gr if k is None else torch.where(k, gr, torch.zeros_like(gr))
            ref.step()
            with torch.no_grad():
                for q, k in zip(params, keeps):
                    if k is not None:
                        q.masked_fill_(~k, 0)
    for foreach, (params, _) in refs.items():
        differing = sum(int((p != q).sum()) for p, q in zip(ours, params))
        print(f"masked AdamW on CUDA [{kernels}] (amsgrad={amsgrad}, weight_decay={weight_decay}): "
              f"{differing} of {sum(p.numel() for p in ours)} elements differ from AdamW(foreach={foreach})")
    for p, q in zip(ours, refs[True][0]):
        assert torch.equal(p.view(torch.int32), q.detach().view(torch.int32))


@pytest.mark.parametrize("name", ["sgd", "sgd-fused", "adamw", "adamw-amsgrad"])
def test_planned_steps_are_the_general_steps_on_cuda(kernels, name):
    # the steady-state step plans (ops/_plan.py) on CUDA parameters: bit for bit the general front
    # end's steps, in the kernels' own arithmetic, channels_last included
    from dsd_kernels.optim import MaskedAdamW, MaskedSGD
    make = {"sgd": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "sgd-fused-device-lr": lambda ps: MaskedSGD(ps, lr=torch.tensor(0.05, device="cuda"), momentum=0.9,
                                                         fused=True),
            "sgd-fused": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, fused=True),
            "adamw": lambda ps: MaskedAdamW(ps, lr=1e-2),
            "adamw-amsgrad": lambda ps: MaskedAdamW(ps, lr=1e-2, amsgrad=True)}[name]
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=g) for s in resnet50_weight_shapes()[::6]]
    keeps = [(torch.rand(v.shape, generator=g) > 0.5).cuda() for v in values]
    runs = []
    for planned in (True, False):
        params = [torch.nn.Parameter(v.cuda().contiguous(memory_format=torch.channels_last)
                                     if v.dim() == 4 else v.cuda()) for v in values]
        opt = make(params)
        if not planned:
            opt._group_plan = lambda *args, **kwargs: None
        opt.set_masks(dict(zip(params, keeps)))
        for step in range(4):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda().contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            opt.step()
        if planned:
            assert opt.__dict__["_step_plans"]
        runs.append([p.detach().cpu() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_to_semi_structured_matches_the_masked_layer():
    """A 2:4-pruned fp16 MLP exported to torch's semi-structured weights computes what the
    MaskedLinear layers did (to fp16 rounding); an fp32 layer stays dense, named in a warning."""
    from dsd_kernels.nn import sparsify, to_semi_structured
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda().half()
    sparsify(model, "2:4")
    x = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = model(x)
        to_semi_structured(model)
        got = model(x)
    assert type(model[0].weight.data).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    fp32 = sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)).cuda(), "2:4")
    with pytest.warns(UserWarning, match=r"left 1 2:4 weight\(s\) dense: 0 \(torch.float32"):
        to_semi_structured(fp32)


@pytest.mark.parametrize("name", ["sgd", "sgd-fused-device-lr", "adamw-capturable", "adam-capturable+masks"])
def test_whole_training_step_replays_in_a_cuda_graph(kernels, name):
    # forward, backward and the masked step captured once in a CUDA graph (torch's whole-network
    # recipe: warm-up on a side stream, grads set to None before capture) and replayed on new
    # batches: the same weights as the same steps taken eagerly, pruned weights and their state
    # exactly 0 throughout (not run on a GPU yet)
    from dsd_kernels.optim import MaskedAdamW, MaskedSGD, OptimizerMasks
    make = {"sgd": lambda ps: MaskedSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "sgd-fused-device-lr": lambda ps: MaskedSGD(ps, lr=torch.tensor(0.05, device="cuda"), momentum=0.9,
                                                         fused=True),
            "adamw-capturable": lambda ps: MaskedAdamW(ps, lr=1e-2, capturable=True),
            "adam-capturable+masks": lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True)}[name]
    g = torch.Generator().manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    batches = [(torch.randn(32, 64, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda())
               for _ in range(8)]
    keeps = {0: torch.rand(128, 64, generator=g) > 0.5, 2: torch.rand(10, 128, generator=g) > 0.5}

    def build():
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).cuda()
        model.load_state_dict(init.state_dict())
        opt = make(list(model.parameters()))
        masks = {model[i].weight: k.cuda() for i, k in keeps.items()}
        holder = OptimizerMasks(opt) if name == "adam-capturable+masks" else opt
        holder.set_masks(masks)
        return model, opt, holder

    def train_step(model, opt, x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    eager, eager_opt, _ = build()
    for x, y in batches:
        eager_opt.zero_grad(set_to_none=True)
        train_step(eager, eager_opt, x, y)

    model, opt, holder = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    static_x, static_y = batches[3][0].clone(), batches[3][1].clone()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    _churn_launch_tables()
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the replays stepped
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for i, keep in keeps.items():
        weight, keep = model[i].weight.detach(), keep.cuda()
        assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep]))
        for value in opt.state[model[i].weight].values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                assert torch.equal(value[~keep], torch.zeros_like(value[~keep]))


def _churn_launch_tables():
    # masked steps and re-masking passes over more layouts than any launch-table cache keeps,
    # then the freed memory overwritten: a captured graph must still find its own tables
    g = torch.Generator().manual_seed(7)
    for n in range(1, 100):
        shapes = [(n, 33), (2 * n + 1,)]
        params = [torch.randn(s, generator=g).cuda() for s in shapes]
        masks = [dk.Mask.from_bool((torch.rand(s, generator=g) > 0.5).cuda()) for s in shapes]
        ops.masked_sgd_(params, [torch.ones_like(p) for p in params], [None, None], masks, lr=0.1 * n,
                        momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
        ops.apply_masks_(params, masks)
    garbage = torch.full((64 * 2**20,), -1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    del garbage


def test_capture_of_a_non_capturable_masked_adamw_step_raises(kernels):
    # the op's step sizes are read from host step counts: a replay would repeat them, so capture
    # is refused as torch refuses it for AdamW(capturable=False)
    from dsd_kernels.optim import MaskedAdamW
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = MaskedAdamW([p], lr=1e-2)
    opt.set_masks({p: (torch.rand(64, 64) > 0.5).cuda()})
    p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            opt.step()
