"""Benchmark cases shared by `dsd-kernels bench` and benchmarks/bench_*.py.

Each case times our op and the best plain-torch ways to do the same job in the same
run (torch.utils.benchmark.Timer handles warm-up and CUDA synchronisation), and
reports the ratio against the fastest baseline and the achieved bandwidth of the bytes
the op must move.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.benchmark as tbench

from ._files import atomic_write_text


@dataclass
class Case:
    op: str  # e.g. "magnitude_thresholds"
    name: str  # e.g. "16M fp32"
    bytes_moved: int  # bytes the op must read + write at least once
    ours: Callable[[], object]
    baselines: dict[str, Callable[[], object]] = field(default_factory=dict)
    flops: int | None = None  # for matmuls: report TFLOP/s too
    # not the job, timed beside it for scale: name -> (fn, bytes fn moves); e.g. copy_reference
    references: dict[str, tuple[Callable[[], object], int]] = field(default_factory=dict)


COPY_REFERENCE_BYTES = 2**29  # the copy moves up to this much: far past any cache, little memory


def copy_reference(device: str, bytes_moved: int) -> dict[str, tuple[Callable[[], object], int]]:
    """The memory bandwidth a streaming op can hope for, measured beside it (fp32 buffers of at
    most COPY_REFERENCE_BYTES in all, so it costs no more memory than the op's own tensors):
    `dst.copy_(src)`, read + write counted, and `a.add_(b)`, 2 reads + 1 write counted. A copy's
    stores go to lines it never read, which a CPU reads first (write-allocate) without that
    being counted; an in-place update, like the optimizer steps, writes only lines it read, so
    the second is the fairer scale for them on a CPU."""
    n = min(bytes_moved, COPY_REFERENCE_BYTES) // 8  # fp32 elements per buffer
    src = torch.randn(n, device=device)
    dst = torch.randn(n, device=device)  # written, not just reserved: every page really there
    return {"copy_ (read + write)": (lambda: dst.copy_(src), 8 * n),
            "add_ in place (2 reads + 1 write)": (lambda: dst.add_(src), 12 * n)}


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """Conv and fc weight shapes of torchvision's ResNet-50 (25.5M weights)."""
    shapes = [(64, 3, 7, 7)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                shapes.append((width * 4, in_ch, 1, 1))  # downsample
            in_ch = width * 4
    return shapes + [(1000, 2048)]


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
    from . import ops

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


CASE_FACTORIES: dict[str, Callable[..., list[Case]]] = {"magnitude_select": magnitude_select_cases}


def time_callable(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


# the registry op (_backend) behind each benchmarked public op
_REGISTRY_OP = {"magnitude_thresholds": "magnitude_select", "magnitude_masks": "magnitude_select",
                "masked_sgd_": "masked_sgd", "masked_linear": "masked_linear",
                "masked_linear dX": "masked_linear", "masked_linear dW": "masked_linear",
                "masked_linear step": "masked_linear",
                "apply_masks_": "apply_masks", "MaskedAdamW.step": "apply_masks",
                "masked_adamw_": "masked_adamw"}


def benchmark_backends(device: str, op: str | None = None) -> list[str]:
    """Our backends worth timing for `op` on `device` (all ops when None): the registry's
    rows that auto may choose there and that can run here, fallbacks included (on CPU:
    cpp and torch; the Triton interpreter is a correctness tool, not a benchmark)."""
    from . import _backend
    device_type = torch.device(device).type
    ops = [_REGISTRY_OP.get(op, op)] if op is not None else list(dict.fromkeys(_REGISTRY_OP.values()))
    found = []
    for name in ops:
        for row in _backend.rows_for(name, device_type):
            if row.auto and _backend.row_status(row, device_type)[0] and row.backend not in found:
                found.append(row.backend)
    return found


ROUNDS = 3  # alternating timing rounds per case (see run_case)


def device_time(fn: Callable[[], object], calls: int = 10) -> float | None:
    """Seconds per call that the GPU spends in fn's kernels and copies (torch.profiler, CUDA
    activity only), without the host's launch work; None where the profiler gives nothing."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type.name == "CUDA")
    except Exception as err:  # noqa: BLE001 - an extra figure: the wall times stand without it
        print(f"warning: no GPU busy time ({type(err).__name__}: {err})")
        return None
    return busy_us / calls / 1e6 if busy_us else None


def run_case(case: Case, min_run_time: float = 0.5, backends: list[str] | None = None,
             kernel_times: bool = False) -> dict:
    """Time case.ours under each backend and every baseline; ratios against the best baseline.
    kernel_times (CUDA): also the GPU's busy time per call (device_time).

    Ours and the baselines are timed in ROUNDS alternating rounds of min_run_time / ROUNDS
    each, and each keeps its fastest round's median: on a shared machine, slow drifts (other
    tenants, clocks) then hit both sides alike instead of whichever happened to run first.
    """
    from . import _backend
    backends = backends or [_backend.get_backend()]
    ours: dict[str, float] = {}
    base: dict[str, float] = {}
    refs: dict[str, float] = {}
    per_round = min_run_time / ROUNDS
    for _ in range(ROUNDS):
        for name in backends:
            with _backend.use_backend(name):
                t = time_callable(case.ours, per_round)
            ours[name] = min(t, ours.get(name, t))
        for name, fn in case.baselines.items():
            t = time_callable(fn, per_round)
            base[name] = min(t, base.get(name, t))
        for name, (fn, _) in case.references.items():
            t = time_callable(fn, per_round)
            refs[name] = min(t, refs.get(name, t))
    best_base = min(base, key=base.get) if base else None
    best_ours = min(ours, key=ours.get)
    out = {
        "op": case.op, "case": case.name, "ours_s": ours, "best_backend": best_ours,
        "baselines_s": base, "best_baseline": best_base,
        "speedup_vs_best_baseline": {b: base[best_base] / t for b, t in ours.items()} if best_base else None,
        "bytes_moved": case.bytes_moved, "ours_GBps": {b: case.bytes_moved / t / 1e9 for b, t in ours.items()},
    }
    if refs:  # ours as a fraction of each reference's bandwidth
        ref_GBps = {k: case.references[k][1] / t / 1e9 for k, t in refs.items()}
        out.update(references_s=refs, references_GBps=ref_GBps,
                   ours_fraction_of_reference_GBps={k: {b: gbps / r for b, gbps in out["ours_GBps"].items()}
                                                    for k, r in ref_GBps.items()})
    if case.flops:
        out.update(flops=case.flops, ours_TFLOPs={b: case.flops / t / 1e12 for b, t in ours.items()},
                   baselines_TFLOPs={k: case.flops / v / 1e12 for k, v in base.items()})
    if kernel_times:  # the GPU's own time, apart from the host's (which the wall times include)
        ours_dev, base_dev = {}, {}
        for name in backends:
            with _backend.use_backend(name):
                ours_dev[name] = device_time(case.ours)
        for name, fn in case.baselines.items():
            base_dev[name] = device_time(fn)
        out.update(ours_device_s=ours_dev, baselines_device_s=base_dev,
                   ours_device_GBps={b: case.bytes_moved / t / 1e9 for b, t in ours_dev.items() if t})
    return out


def environment(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = cpu_model()
    from . import _backend
    info["backend"] = _backend.get_backend()
    info["available_backends"] = _backend.available_backends()
    if "cpp" in info["available_backends"]:  # the masked_linear timings depend on it
        info["cpp_masked_linear_tiles"] = torch.ops.dsd_kernels_cpp.masked_linear_tile_kernel()
    return info


def cpu_model() -> str:
    """The CPU's model name (and x86 family/model: which vector units it has), where Linux says."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name", platform.processor() or "unknown")
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def write_results(path: str, env: dict, results: list[dict]) -> None:
    """Write results to path, keeping the cases of an existing file that this run did not time
    (so `bench --ops X` updates X's rows); environment records this run's versions."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    merged = results
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("results", [])
        fresh = {(r["op"], r["case"]) for r in results}
        merged = [r for r in old if (r["op"], r["case"]) not in fresh] + results
    atomic_write_text(path, json.dumps({"environment": env, "results": merged}, indent=2))


def format_row(r: dict) -> str:
    lines = [f"{r['op']}: {r['case']}"]
    for b, t in r["ours_s"].items():
        rate = (f"{r['ours_TFLOPs'][b]:8.3f} TFLOP/s" if r.get("flops") else f"{r['ours_GBps'][b]:8.2f} GB/s")
        ratio = (f"{r['speedup_vs_best_baseline'][b]:6.2f}x vs best baseline"
                 if r["speedup_vs_best_baseline"] else "")
        lines.append(f"    ours [{b:<6}] {t * 1e3:10.3f} ms {rate}  {ratio}")
    for k, v in r["baselines_s"].items():
        lines.append(f"    {k:<50} {v * 1e3:10.3f} ms")
    for k, v in r.get("references_s", {}).items():
        fractions = ", ".join(f"{b} {f:.0%}" for b, f in r["ours_fraction_of_reference_GBps"][k].items())
        lines.append(f"    reference: {k:<39} {v * 1e3:10.3f} ms {r['references_GBps'][k]:8.2f} GB/s"
                     f"  (ours at {fractions} of it)")
    if r.get("ours_device_s"):
        busy = {**{f"ours [{b}]": t for b, t in r["ours_device_s"].items()}, **r["baselines_device_s"]}
        lines.append("    GPU busy per call: " + ", ".join(
            f"{k} {t * 1e3:.3f} ms" if t else f"{k} ?" for k, t in busy.items()))
    return "\n".join(lines)


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
    from .optim import MaskedSGD

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


CASE_FACTORIES["masked_sgd"] = masked_sgd_cases

GPT2_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out)
LLAMA7B_LINEARS = [(4096, 4096), (4096, 11008), (11008, 4096)]
# the GPU cases (tokens, in, out): MLP shapes of GPT-2 and LLaMA-7B, decode to long prefill
GPU_LINEAR_SHAPES = [(t, i, o) for t in (1, 2048, 8192) for i, o in GPT2_LINEARS[2:] + LLAMA7B_LINEARS[1:]]
BLOCK_SPARSITIES = (0.5, 0.75, 0.9)  # 64x64 block masks of the cases, beside unstructured 50%


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

    from . import ops
    from .dense_matmul import linear, onednn_linear_available

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
                           **({"dense oneDNN linear(x, W)": lambda x=x, w=w: linear(x, w)} if onednn else {})},
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


CASE_FACTORIES["masked_linear"] = masked_linear_cases


def apply_masks_cases(device: str) -> list[Case]:
    """The re-masking pass DSD runs around any optimizer's step (OptimizerMasks): GPT-2 small's
    weights of 2 or more dims (50% masks) zeroed where pruned, against the per-tensor
    `p.mul_(mask)` loop peers use (apex ASP) and a torch._foreach_mul_ over all of them. The
    AdamW(fused=True) step on the same parameters is timed beside, as the scale of the cost."""
    from . import ops
    from .masks import Mask

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


CASE_FACTORIES["apply_masks"] = apply_masks_cases


def masked_adamw_cases(device: str, param_sets: tuple[str, ...] = ("resnet50", "gpt2-small")) -> list[Case]:
    """One masked AdamW step (50% masks on >= 2-D params) against AdamW(fused=True) /
    AdamW(foreach=True) plus the two mask multiplies (gradients before, weights after, as apex
    ASP does; see mask_multiply_baselines), two ways: `masked_adamw_`, MaskedAdamW's default step (one
    fused masked pass: on CPU the C++ kernel with torch's single-tensor/foreach bits), and
    `MaskedAdamW.step` with fused=True (on CPU the C++ kernel with the bits of torch's fused
    kernel; the torch composite: torch's fused AdamW, then one re-masking pass)."""
    from .optim import MaskedAdamW

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


CASE_FACTORIES["masked_adamw"] = masked_adamw_cases
