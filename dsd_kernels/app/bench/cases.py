"""The benchmark cases of every op (`dsd-kernels bench`, benchmarks/bench_*.py): parameter
sets shaped like real models and, per case, our op beside the best plain-torch baselines."""
from __future__ import annotations

from typing import Callable

import torch

from .host_step import host_step_cases
from .mask_update_cases import mask_update_cases
from .model_shapes import resnet50_weight_shapes
from .training import training_cases
from .timing import Case, copy_reference


def resnet50_sgd_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's conv and fc weights with the batch-norm weights and biases (1-D, never masked)."""
    shapes = resnet50_weight_shapes()
    return shapes + [(s[0],) for s in shapes[:-1] for _ in range(2)] + [(1000,)]


def gpt2_small_param_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M) parameter shapes, embeddings and biases included."""
    d, v, ctx = 768, 50257, 1024
    shapes = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


THRESHOLD_SIZES_M = (1, 16, 64)  # single-tensor selection cases, in M elements


def magnitude_select_cases(device: str, sizes_m: tuple[int, ...] = THRESHOLD_SIZES_M) -> list[Case]:
    from ... import ops

    cases = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m in sizes_m:
        w = torch.randn(m * 2**20, generator=gen).to(device)
        k = w.numel() // 2
        cases.append(Case(
            "magnitude_thresholds", f"{m}M fp32 k=N/2", w.numel() * w.element_size(),
            ours=lambda w=w: ops.magnitude_thresholds(w, 0.5),
            baselines={
                "torch.kthvalue(w.abs(), k)": lambda w=w, k=k: torch.kthvalue(w.abs(), k),
                "torch.topk(w.abs(), k, largest=False)":
                    lambda w=w, k=k: torch.topk(w.abs(), k, largest=False, sorted=False),
            }))
    # the masks of one 16M-element tensor (a gradual prune selects at every step of its ramp),
    # against one pass that reads and writes the weight: the scale of the memory limit
    w = torch.randn(16 * 2**20, generator=gen).to(device)
    cases.append(Case(
        "magnitude_masks", "16M fp32 s=0.5", w.numel() * 4 + w.numel() // 8,
        ours=lambda w=w: ops.magnitude_masks(w, 0.5),
        baselines={"kthvalue + (|w| > t)":
                   lambda w=w: w.abs() > torch.kthvalue(w.abs(), w.numel() // 2).values},
        references=abs_pass_reference(w)))
    weights = [torch.randn(s, generator=gen).to(device) for s in resnet50_weight_shapes()]
    total = sum(w.numel() for w in weights)

    def kth_loop(ws=weights):
        return [torch.kthvalue(w.abs().reshape(-1), max(1, round(0.5 * w.numel()))).values for w in ws]

    cases.append(Case(
        "magnitude_thresholds", f"ResNet-50 weights ({total / 1e6:.1f}M, {len(weights)} layers)",
        total * 4, ours=lambda ws=weights: ops.magnitude_thresholds(ws, 0.5),
        baselines={"per-layer torch.kthvalue loop": kth_loop}))
    cases.append(Case(
        "magnitude_masks", f"ResNet-50 weights ({total / 1e6:.1f}M, {len(weights)} layers)",
        total * 4 + total // 8, ours=lambda ws=weights: ops.magnitude_masks(ws, 0.5),
        baselines={"per-layer kthvalue + (|w| > t) loop":
                   lambda ws=weights: [w.abs() > t for w, t in zip(ws, kth_loop(ws))]}))
    return cases


def abs_pass_reference(w: torch.Tensor) -> dict:
    """One torch.abs(w, out=buf) pass (reads and writes the weight), bytes counted 2 x the
    weight: the memory scale of a mask op, which reads the weight and writes 1 bit per weight."""
    buf = torch.empty_like(w)
    return {"torch.abs(w, out=buf)": (lambda: torch.abs(w, out=buf), 2 * w.numel() * w.element_size())}


def nm_masks_cases(device: str) -> list[Case]:
    """2:4 masks of a 4096x4096 fp32 weight against torch's abs().view(-1, 4).topk(2) + scatter,
    with one abs pass over the weight beside it (abs_pass_reference)."""
    from ... import ops

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(device)

    def topk_scatter(w=w):
        groups = w.abs().view(-1, 4)
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)

    return [Case("nm_masks", "2:4 of 4096x4096 fp32", w.numel() * 4 + w.numel() // 8,
                 ours=lambda: ops.magnitude_masks(w, "2:4"),
                 baselines={"abs().view(-1, 4).topk(2) + scatter": topk_scatter},
                 references=abs_pass_reference(w))]


def mask_multiply_baselines(optimizer_cls, make_params, keeps, hyper: dict) -> dict:
    """The peers' masked step for a torch optimizer, with foreach=True and with fused=True: the
    gradients multiplied by the masks before the step and the weights after it (what apex ASP
    does), done the fastest way torch offers: masks held in the parameter's dtype and memory
    format (multiplying by a bool mask converts it on every call, several times slower) and one
    torch._foreach_mul_ per side. make_params() gives fresh parameters with gradients; keeps[i]:
    the bool mask of parameter i or None."""
    baselines = {}
    for flavour in ("foreach", "fused"):
        params = make_params()
        try:
            opt = optimizer_cls(params, **hyper, **{flavour: True})
            opt.step()
        except (RuntimeError, ValueError):
            continue  # that implementation is unsupported on this device/torch
        masked = [p for p, k in zip(params, keeps) if k is not None]
        masks = [torch.empty_like(p).copy_(k) for p, k in zip(params, keeps) if k is not None]

        def baseline(opt=opt, masked=masked, masks=masks):
            torch._foreach_mul_([p.grad for p in masked], masks)
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(masked, masks)

        baselines[f"{optimizer_cls.__name__}({flavour}=True) + mask multiplies"] = baseline
    return baselines


def masked_sgd_cases(device: str, param_sets: tuple[str, ...] = ("resnet50", "resnet50 channels_last",
                                                                "gpt2-small")) -> list[Case]:
    """One SGD step (momentum 0.9, weight decay 1e-4, 50% masks on >= 2-D params) on whole
    parameter sets, against SGD(foreach=True) / SGD(fused=True) plus the two mask multiplies
    (gradients before, weights after: what apex ASP does; see mask_multiply_baselines). "channels_last": the
    ResNet-50 conv weights and their gradients in channels_last memory order, for both sides."""
    from ...optim import MaskedSGD

    shapes_of = {"resnet50": resnet50_sgd_shapes, "gpt2-small": gpt2_small_param_shapes}
    cases = []
    for name in param_sets:
        model, _, layout = name.partition(" ")
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        gen = torch.Generator(device="cpu").manual_seed(0)
        shapes = shapes_of[model]()
        values = [torch.randn(s, generator=gen) for s in shapes]
        keeps = [(torch.rand(s, generator=gen) > 0.5).to(device) if len(s) >= 2 else None
                 for s in shapes]
        hyper = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)

        def fresh(values=values, memory_format=memory_format):
            params = [torch.nn.Parameter(v.to(device).contiguous(memory_format=memory_format)
                                         if v.dim() == 4 else v.to(device)) for v in values]
            for p in params:
                p.grad = torch.randn_like(p)  # in the parameter's memory format
            return params

        ours_params = fresh()
        ours = MaskedSGD(ours_params, **hyper)
        ours.set_masks({p: k for p, k in zip(ours_params, keeps) if k is not None})
        numel = sum(v.numel() for v in values)
        masked = sum(v.numel() for v, k in zip(values, keeps) if k is not None)
        bytes_moved = numel * 4 * 5 + masked // 8  # read p, g, buf; write p, buf; mask bits
        baselines = mask_multiply_baselines(torch.optim.SGD, fresh, keeps, hyper)
        cases.append(Case("masked_sgd_", f"{name} ({numel / 1e6:.1f}M params, 50% masks)",
                          bytes_moved, ours=ours.step, baselines=baselines,
                          references=copy_reference(device, bytes_moved)))
    return cases



GPT2_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out)
LLAMA7B_LINEARS = [(4096, 4096), (4096, 11008), (11008, 4096)]
# the GPU cases (tokens, in, out): MLP shapes of GPT-2 and LLaMA-7B, decode to long prefill
GPU_LINEAR_SHAPES = [(t, i, o) for t in (1, 2048, 8192) for i, o in GPT2_LINEARS[2:] + LLAMA7B_LINEARS[1:]]
BLOCK_SPARSITIES = (0.5, 0.75, 0.9)  # 64x64 block masks of the cases, beside unstructured 50%


def _bsr_baseline(x: torch.Tensor, masked_weight: torch.Tensor) -> dict:
    """torch's block-sparse matmul on the masked weight in 64x64 BSR blocks (torch.sparse), as
    y = (W_bsr @ x^T)^T; none where this torch has no BSR matmul for the dtype and device."""
    try:
        bsr = masked_weight.to_sparse_bsr((64, 64))
        (bsr @ x.t()).t()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        print(f"note: no BSR baseline ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
        return {}
    return {"torch BSR (64x64) @ x^T": lambda: (bsr @ x.t()).t()}


def masked_linear_cases(device: str, shapes: list[tuple[int, int, int]] | None = None) -> list[Case]:
    """masked_linear against F.linear(x, W*M) and dense F.linear(x, W), same run. Masks:
    unstructured 50% and 64x64 blocks at 50/75/90%.

    CPU: fp32, the 512 x 1024 -> 1024 layer and a transformer MLP's two (2048 tokens, 768 -> 3072
    and 3072 -> 768), and the MLP's at decoding (1 and 4 tokens); the forward, the two gradients (dX = dY (W*M), dW = (dY^T X) * M) and all
    three as one training step, each against the same products done by torch (MKL through
    F.linear / @, and dense oneDNN through torch.ops.mkldnn where torch has it). GPU: bf16
    forwards, the MLP shapes of GPT-2 and LLaMA-7B, 1 to 8192 tokens. shapes: (tokens, in, out)
    instead of those.
    """
    import torch.nn.functional as F

    from ... import ops
    from ...backends.dense_matmul import linear, onednn_linear_available

    if device.startswith("cuda"):
        dtype = torch.bfloat16
        default = GPU_LINEAR_SHAPES
    else:
        dtype = torch.float32
        default = [(512, 1024, 1024), (2048, 768, 3072), (2048, 3072, 768), (1, 768, 3072), (4, 3072, 768)]
    shapes = shapes or default
    gradients = not device.startswith("cuda")
    backward = torch.ops.dsd_kernels.masked_linear_backward
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = []
    for tokens, d_in, d_out in shapes:
        x = torch.randn(tokens, d_in, generator=gen).to(device, dtype)
        w = torch.randn(d_out, d_in, generator=gen).to(device, dtype)
        dy = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
        masks = {"unstructured 50%": ops.magnitude_masks(w, 0.5)[0]}
        for s in BLOCK_SPARSITIES:
            masks[f"64x64 blocks {s:.0%}"] = ops.magnitude_masks(w, s, block=(64, 64))[0]
        e = x.element_size()
        mm_flops = 2 * tokens * d_in * d_out
        for kind, mask in masks.items():
            words = mask.packed.to(device)
            m = mask.to_bool().to(device, dtype)
            name = f"{tokens}x{d_in}->{d_out} {kind} {str(dtype)[6:]}"
            fwd_bytes = (tokens * d_in + d_in * d_out + tokens * d_out) * e
            # torch's fastest dense fp32 matmul on CPU where it has oneDNN (what inductor emits;
            # MKL's sgemm behind F.linear measured slower on this project's AMD CPU)
            onednn = gradients and onednn_linear_available(x)
            cases.append(Case(
                "masked_linear", name, fwd_bytes,
                ours=lambda x=x, w=w, k=words: ops.masked_linear(x, w, k),
                baselines={"F.linear(x, W*M)": lambda x=x, w=w, m=m: F.linear(x, w * m),
                           "dense F.linear(x, W)": lambda x=x, w=w: F.linear(x, w),
                           **({"dense oneDNN linear(x, W)": lambda x=x, w=w: linear(x, w)} if onednn else {}),
                           **(_bsr_baseline(x, w * m) if kind.startswith("64x64") and device.startswith("cuda")
                              else {})},
                flops=mm_flops))
            if not gradients:
                continue
            cases.append(Case(
                "masked_linear dX", name, fwd_bytes,
                ours=lambda dy=dy, x=x, w=w, k=words: backward(dy, x, w, k, True, False, False),
                baselines={"dY @ (W*M)": lambda dy=dy, w=w, m=m: dy @ (w * m),
                           "dense dY @ W": lambda dy=dy, w=w: dy @ w,
                           **({"dense oneDNN dY @ W": lambda dy=dy, w=w: linear(dy, w.t())} if onednn else {})},
                flops=mm_flops))
            cases.append(Case(
                "masked_linear dW", name, fwd_bytes,
                ours=lambda dy=dy, x=x, w=w, k=words: backward(dy, x, w, k, False, True, False),
                baselines={"(dY^T @ X) * M": lambda dy=dy, x=x, m=m: (dy.t() @ x) * m,
                           "dense dY^T @ X": lambda dy=dy, x=x: dy.t() @ x,
                           **({"dense oneDNN dY^T @ X": lambda dy=dy, x=x: linear(dy.t(), x.t())} if onednn else {})},
                flops=mm_flops))

            def torch_step(x=x, w=w, dy=dy, m=m):
                wm = w * m
                return F.linear(x, wm), dy @ wm, (dy.t() @ x) * m

            cases.append(Case(
                "masked_linear step", name, 3 * fwd_bytes,
                ours=lambda dy=dy, x=x, w=w, k=words: (ops.masked_linear(x, w, k),
                                                       backward(dy, x, w, k, True, True, False)),
                baselines={"F.linear(x, W*M), dY @ (W*M), (dY^T @ X) * M": torch_step,
                           "dense: the three matmuls": lambda x=x, w=w, dy=dy: (F.linear(x, w), dy @ w,
                                                                                dy.t() @ x),
                           **({"dense oneDNN: the three matmuls": lambda x=x, w=w, dy=dy: (
                               linear(x, w), linear(dy, w.t()), linear(dy.t(), x.t()))} if onednn else {})},
                flops=3 * mm_flops))
    return cases




def apply_masks_cases(device: str) -> list[Case]:
    """The re-masking pass DSD runs around any optimizer's step (OptimizerMasks): GPT-2 small's
    weights of 2 or more dims (50% masks) zeroed where pruned, against the per-tensor
    `p.mul_(mask)` loop peers use (apex ASP) and a torch._foreach_mul_ over all of them. The
    AdamW(fused=True) step on the same parameters is timed beside, as the scale of the cost."""
    from ... import ops
    from ...masks import Mask

    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [s for s in gpt2_small_param_shapes() if len(s) >= 2]
    weights = [torch.randn(s, generator=gen).to(device) for s in shapes]
    keeps = [(torch.rand(s, generator=gen) > 0.5).to(device) for s in shapes]
    masks = [Mask.from_bool(k) for k in keeps]
    floats = [k.to(torch.float32) for k in keeps]
    numel = sum(w.numel() for w in weights)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p in params:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
    adamw.step()
    return [Case("apply_masks_", f"gpt2-small weights ({numel / 1e6:.1f}M, 50% masks)",
                 numel * 4 * 2 + numel // 8,
                 ours=lambda: ops.apply_masks_(weights, masks),
                 baselines={"per-tensor p.mul_(mask) loop": lambda: [w.mul_(f) for w, f in zip(weights, floats)],
                            "torch._foreach_mul_(weights, masks)": lambda: torch._foreach_mul_(weights, floats),
                            "scale: AdamW(fused=True).step() on these weights": adamw.step},
                 references=copy_reference(device, numel * 4 * 2))]




def masked_adamw_cases(device: str, param_sets: tuple[str, ...] = ("resnet50", "gpt2-small")) -> list[Case]:
    """One masked AdamW step (50% masks on >= 2-D params) against AdamW(fused=True) /
    AdamW(foreach=True) plus the two mask multiplies (gradients before, weights after, as apex
    ASP does; see mask_multiply_baselines), two ways: `masked_adamw_`, MaskedAdamW's default step (one
    fused masked pass: on CPU the C++ kernel with torch's single-tensor/foreach bits), and
    `MaskedAdamW.step` with fused=True (on CPU the C++ kernel with the bits of torch's fused
    kernel; the torch composite: torch's fused AdamW, then one re-masking pass)."""
    from ...optim import MaskedAdamW

    shapes_of = {"resnet50": resnet50_weight_shapes, "gpt2-small": gpt2_small_param_shapes}
    cases = []
    for name in param_sets:
        gen = torch.Generator(device="cpu").manual_seed(0)
        shapes = shapes_of[name]()
        values = [torch.randn(s, generator=gen) for s in shapes]
        keeps = [(torch.rand(s, generator=gen) > 0.5).to(device) if len(s) >= 2 else None for s in shapes]

        def fresh(values=values):
            params = [torch.nn.Parameter(v.to(device)) for v in values]
            for p in params:
                p.grad = torch.randn_like(p)
            return params

        numel = sum(v.numel() for v in values)
        masked = sum(v.numel() for v, k in zip(values, keeps) if k is not None)
        baselines = mask_multiply_baselines(torch.optim.AdamW, fresh, keeps, dict(lr=1e-3))
        copy = copy_reference(device, numel * 4 * 7)
        for op, flags in (("masked_adamw_", {}), ("MaskedAdamW.step", {"fused": True})):
            ours_params = fresh()
            ours = MaskedAdamW(ours_params, lr=1e-3, **flags)
            ours.set_masks({p: k for p, k in zip(ours_params, keeps) if k is not None})
            ours.step()  # the state exists before timing, as in the baselines
            # what the step must move: AdamW reads p, g, m, v and writes p, m, v, + the mask bits
            # (the torch composite moves more: its re-masking pass reads and writes p, m, v again)
            bytes_moved = numel * 4 * 7 + masked // 8
            cases.append(Case(op, f"{name} ({numel / 1e6:.1f}M params, 50% masks)", bytes_moved,
                              ours=ours.step, baselines=baselines, references=copy))
    return cases


CASE_FACTORIES: dict[str, Callable[..., list[Case]]] = {
    "magnitude_select": magnitude_select_cases, "masked_sgd": masked_sgd_cases,
    "masked_linear": masked_linear_cases, "apply_masks": apply_masks_cases, "masked_adamw": masked_adamw_cases,
    "nm_masks": nm_masks_cases, "host_step": host_step_cases, "training": training_cases,
    "mask_update": mask_update_cases}
