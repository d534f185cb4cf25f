"""The tables over every results file at once: README's headline figures and the benchmarks
page's CPU targets on each vector capability (tables.py registers them)."""
from __future__ import annotations

from . import figures as F
from .training import TWO_PASSES


def _headline_rows(files: dict) -> list[tuple[str, str, str, str]]:
    """(case, device, ours, ratio) of README's headline table, each figure read from `files`
    ({file name: its JSON})."""
    cpu, avx2 = files["cpu-2core-x86_64.json"], files["cpu-x86_64-avx2.json"]
    training, gpu = files["training-cpu-2core-x86_64-avx2.json"], files["NVIDIA-H200.json"]
    rows = []

    def row(case, source, ours, ratio):
        rows.append((case, F.device(source["environment"]), ours, ratio))

    c = cpu["results"]
    r = F.find(c, "magnitude_thresholds", "64M fp32 k=N/2")
    row("thresholds, 64M fp32", cpu, f"{F.ms(F.ours(r))} ms", f"{F.speedup(r):.1f}x `torch.kthvalue`")
    r = F.find(c, "magnitude_masks", "ResNet-50 weights (25.5M, 54 layers)")
    row("masks, ResNet-50 weights (54 layers)", cpu, f"{F.ms(F.ours(r))} ms",
        f"{F.speedup(r):.1f}x per-layer kthvalue + compare")
    r = F.find(c, "nm_masks", "2:4 of 4096x4096 fp32")
    row("2:4 masks, 4096x4096 fp32", cpu,
        f"{F.ms(F.ours(r))} ms, {F.ours(r) / r['references_s']['torch.abs(w, out=buf)']:.2f}x one `abs` pass",
        f"{F.speedup(r):.0f}x `abs().view(-1, 4).topk(2)` + scatter")
    r = F.find(c, "masked_sgd_", "gpt2-small (124.4M params, 50% masks)")
    row("masked SGD step, GPT-2 small (124M, 50% masks)", cpu,
        f"{F.ms(F.ours(r))} ms, {F.fraction(r, 'add_ in place (2 reads + 1 write)'):.0%} of in-place `add_` bandwidth",
        f"{F.speedup(r):.2f}x `SGD(fused=True)` + mask multiplies")
    r = F.find(c, "MaskedAdamW.step", "gpt2-small (124.4M params, 50% masks)")
    row("masked AdamW step, fused bits, GPT-2 small", cpu, f"{F.ms(F.ours(r))} ms",
        f"{F.speedup(r):.2f}x `AdamW(fused=True)` + mask multiplies")
    host = [x for x in c if x["op"] == "host-bound step"]
    times, ratios = [F.ours(x) for x in host], [1 / F.speedup(x) for x in host]
    row(f"host-bound step, 148 small tensors, one thread", cpu, f"{F.ms(min(times))}-{F.ms(max(times))} ms",
        f"{min(ratios):.2f}-{max(ratios):.2f}x the time of torch's fused step of the same optimizer")
    case = "512x1024->1024 64x64 blocks 90% float32"
    r = F.find(c, "masked_linear step", case)
    row("masked_linear step, 64x64 blocks 90% pruned, 512x1024->1024 fp32", cpu, "",
        f"{r['baselines_s']['dense: the three matmuls'] / F.ours(r):.1f}x dense MKL, "
        f"{r['baselines_s']['dense oneDNN: the three matmuls'] / F.ours(r):.1f}x dense oneDNN")
    r = F.find(avx2["results"], "masked_linear step", case)
    row("masked_linear step, 64x64 blocks 90% pruned, 512x1024->1024 fp32", avx2, f"{F.ms(F.ours(r))} ms",
        f"{r['baselines_s']['dense: the three matmuls'] / F.ours(r):.2f}x dense MKL")
    r = F.find(avx2["results"], "mask_update", next(x["case"] for x in avx2["results"] if x["op"] == "mask_update"))
    reference = next(iter(r["references_s"].values()))
    row("RigL mask update, ResNet-50 weights, 80% sparse, 30% moved", avx2,
        f"{F.ms(F.ours(r))} ms, {F.ours(r) / reference:.1f}x one `abs` pass over weights and gradients",
        f"{F.speedup(r):.1f}x per-layer `torch.topk`")
    t = training["results"]
    block = [F.find(t, "training step", f"MLP stack, {o} + DSDScheduler(block=(64, 64)), 90% of tiles, batch 256, "
                                      f"one thread")["time_vs_dense_step"]["ours [auto]"]
             for o in ("MaskedSGD", "MaskedAdamW")]
    row("whole training step, block DSD 90% of 64x64 tiles, MLP stack (18.9M), MaskedSGD / MaskedAdamW, batch 256",
        training, f"{block[0]:.3f}x / {block[1]:.3f}x the dense step's time",
        f"{1 / block[0]:.1f}x / {1 / block[1]:.1f}x faster than dense")
    r = F.find(t, "training step", "MLP stack, AdamW + DSDScheduler masks (OptimizerMasks: one pass), 50% unstructured, "
                                  "batch 64, one thread")
    row("whole training step, AdamW through DSDScheduler masks (one pass), 50% unstructured, batch 64", training,
        f"{r['time_vs_dense_step']['ours [auto]']:.3f}x the dense step's time",
        f"two passes: {r['time_vs_dense_step'][TWO_PASSES]:.3f}x")
    g = gpu["results"]
    sgd = [F.find(g, "masked_sgd_", f"{m} (25.6M params, 50% masks)" if m == "resnet50" else
                 f"{m} (124.4M params, 50% masks)") for m in ("resnet50", "gpt2-small")]
    row("masked SGD step (Triton), ResNet-50 / GPT-2 small", gpu,
        f"{F.ms(sgd[0]['ours_s']['triton'])} / {F.ms(sgd[1]['ours_s']['triton'])} ms wall",
        f"{F.speedup(sgd[0], 'triton'):.2f}x / {F.speedup(sgd[1], 'triton'):.2f}x `SGD(fused=True)` + float-mask "
        f"multiplies")
    adamw = [F.find(g, "masked_adamw_", f"{m} (25.5M params, 50% masks)" if m == "resnet50" else
                   f"{m} (124.4M params, 50% masks)") for m in ("resnet50", "gpt2-small")]
    row("masked AdamW step (Triton), ResNet-50 / GPT-2 small", gpu,
        f"{F.ms(adamw[0]['ours_s']['triton'])} / {F.ms(adamw[1]['ours_s']['triton'])} ms wall, "
        f"{F.fraction(adamw[1], 'copy_ (read + write)', 'triton'):.0%} of `copy_` bandwidth (GPT-2)",
        f"{F.speedup(adamw[0], 'triton'):.2f}x / {F.speedup(adamw[1], 'triton'):.2f}x `AdamW(fused=True)` + "
        f"float-mask multiplies")
    return rows


def headline_table(files: dict) -> str:
    lines = ["| case | device | ours | ratio |", "|---|---|---|---|"]
    previous = None
    for case, device, ours, ratio in _headline_rows(files):
        lines.append(f"| {case} | {'same' if device == previous else device} | {ours} | {ratio} |")
        previous = device
    return "\n".join(lines)


# The CPU targets measured on each vector capability (issue: fast on every CPU): (what, target,
# figure of a results list; None where the file lacks the case)
def _cpp(r: dict) -> float:
    return r["ours_s"]["cpp"]


def _get(results: list[dict], op: str, case: str) -> dict | None:
    try:
        return F.find(results, op, case)
    except KeyError:
        return None


def _of_abs(op: str, case: str, reference: str):
    def figure(results):
        r = _get(results, op, case)
        return None if r is None else f"{_cpp(r) / r['references_s'][reference]:.2f}x"
    return figure


def _host_step(case: str):
    def figure(results):
        r = _get(results, "host-bound step", f"{case}, 148 fp32 tensors, one thread")
        return None if r is None else f"{_cpp(r) / next(iter(r['baselines_s'].values())):.2f}x"
    return figure


def _faster(op: str, shape: str, baseline: str, kinds=("64x64 blocks 50%", "64x64 blocks 75%", "64x64 blocks 90%")):
    def figure(results):
        rs = [_get(results, op, f"{shape} {kind} float32") for kind in kinds]
        if any(r is None for r in rs):
            return None
        return " / ".join(f"{r['baselines_s'][baseline] / _cpp(r):.2f}" for r in rs) + "x"
    return figure


def _sgd_bandwidth(results):
    r = _get(results, "masked_sgd_", "gpt2-small (124.4M params, 50% masks)")
    return None if r is None else f"{r['ours_fraction_of_reference_GBps']['add_ in place (2 reads + 1 write)']['cpp']:.0%}"


def _apply_masks(results):
    r = _get(results, "apply_masks_", "gpt2-small weights (124.3M, 50% masks)")
    return None if r is None else f"{_cpp(r) / r['baselines_s']['torch._foreach_mul_(weights, masks)']:.2f}x"


def _decoding_unstructured(results):
    figures = [_faster("masked_linear step", shape, "F.linear(x, W*M), dY @ (W*M), (dY^T @ X) * M",
                       kinds=("unstructured 50%",))(results) for shape in ("1x768->3072", "4x3072->768")]
    return None if None in figures else " / ".join(f.rstrip("x") for f in figures) + "x"


def _masked_adamw(results):
    r = _get(results, "masked_adamw_", "gpt2-small (124.4M params, 50% masks)")
    return None if r is None else f"{r['baselines_s']['AdamW(fused=True) + mask multiplies'] / _cpp(r):.2f}x"


def _mask_update(results):
    r = next((x for x in results if x["op"] == "mask_update"), None)
    return None if r is None else f"{_cpp(r) / next(iter(r['references_s'].values())):.2f}x"


CAPABILITY_ROWS = [
    ("masks of a 16M fp32 tensor, time / one `torch.abs(w, out=buf)` pass", "<= 2x",
     _of_abs("magnitude_masks", "16M fp32 s=0.5", "torch.abs(w, out=buf)")),
    ("2:4 masks, 4096x4096 fp32, time / one abs pass", "<= 1.5x",
     _of_abs("nm_masks", "2:4 of 4096x4096 fp32", "torch.abs(w, out=buf)")),
    ("masked SGD step, GPT-2 small (124M, 50% masks), share of an in-place `add_` pass's bandwidth", ">= 85%",
     _sgd_bandwidth),
    ("host-bound step, 148 small tensors: `MaskedSGD(fused=True)`, time / `SGD(fused=True)`", "<= 1.2x",
     _host_step("MaskedSGD(momentum=0.9, fused=True)")),
    ("host-bound step, 148 small tensors: `Adam(fused=True)` + `OptimizerMasks`, time / `Adam(fused=True)`",
     "<= 1.2x", _host_step("Adam(fused=True) + OptimizerMasks")),
    ("`apply_masks_` (C++), GPT-2 small weights, time / `torch._foreach_mul_` with float masks", "<= 1x",
     _apply_masks),
    ("block 64x64 `masked_linear` forward, 512x1024->1024, 50 / 75 / 90% pruned: faster than dense `F.linear`",
     ">= 1.5 / 3 / 6x", _faster("masked_linear", "512x1024->1024", "dense F.linear(x, W)")),
    ("block 64x64 `masked_linear` fwd+bwd, 2048x3072->768, 50 / 75 / 90% pruned: faster than the dense matmuls",
     ">= 1.5 / 3 / 6x", _faster("masked_linear step", "2048x3072->768", "dense: the three matmuls")),
    ("unstructured 50% `masked_linear` fwd+bwd, 2048x3072->768: faster than the matmuls with `W*M`", ">= 1x",
     _faster("masked_linear step", "2048x3072->768", "F.linear(x, W*M), dY @ (W*M), (dY^T @ X) * M",
             kinds=("unstructured 50%",))),
    ("unstructured 50% `masked_linear` fwd+bwd, 1x768->3072 / 4x3072->768 (decoding): faster than the matmuls "
     "with `W*M`", ">= 1x",
     _decoding_unstructured),
    ("masked AdamW step (`masked_adamw_`, torch's foreach bits), GPT-2 small (124M, 50% masks): faster than "
     "`AdamW(fused=True)` + mask multiplies", ">= 1x", _masked_adamw),
    ("RigL mask update, ResNet-50 weights (80% sparse, 30% moved), time / one abs pass over weights and gradients",
     "<= 3x", _mask_update),
]
# the capability files, in the table's column order
CAPABILITY_FILES = ("cpu-2core-x86_64.json", "cpu-x86_64-avx2.json")


def capabilities_table(files: dict) -> str:
    """docs/benchmarks.md's CPU targets on each vector capability: one column per results file of
    CAPABILITY_FILES (headed by its machine, capability and date), the C++ backend's figures."""
    sources = [files[name] for name in CAPABILITY_FILES]
    heads = [f"{F.device(f['environment'])}, {f['environment'].get('date', '?')}" for f in sources]
    lines = ["| case | target | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(sources)]
    for what, target, figure in CAPABILITY_ROWS:
        cells = [figure(f["results"]) or "not measured" for f in sources]
        lines.append(f"| {what} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


