"""Markdown tables of committed bench results, so that the figures on the docs pages come from
the results JSON and nowhere else. A page holds each generated table between the markers
`<!-- table:NAME -->` and `<!-- /table:NAME -->`; tests/test_docs.py checks that what is there is
what this module writes from the committed file.

    python -m dsd_kernels.app.bench.tables training benchmarks/results/training-cpu-2core-x86_64-avx2.json
    python -m dsd_kernels.app.bench.tables training RESULTS.json --write docs/benchmarks.md
    python -m dsd_kernels.app.bench.tables default-run docs/default-run/report.json --write docs/train.md
    python -m dsd_kernels.app.bench.tables sparse-run docs/sparse-run/report.json --write docs/dynamic-sparsity.md
    python -m dsd_kernels.app.bench.tables headline benchmarks/results --write README.md
    python -m dsd_kernels.app.bench.tables capabilities benchmarks/results --write docs/benchmarks.md
    python -m dsd_kernels.app.bench.tables cases benchmarks/results/cpu-x86_64-avx2.json --write docs/benchmarks.md \
        --marker cases@cpu-x86_64-avx2
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from .training import PRUNE, SPARSIFIER, TWO_PASSES

_UNSTRUCTURED = re.compile(r"^(?P<model>.+?), (?P<opt>SGD\(momentum=0\.9\)|AdamW): (?P<ours>Masked\w+), 50% "
                           r"unstructured, batch (?P<batch>.+?), one thread$")
_ONE_PASS = re.compile(r"^(?P<model>.+?), (?P<opt>SGD\(momentum=0\.9\)|AdamW) \+ DSDScheduler masks")
_BLOCK = re.compile(r"^(?P<model>.+?), (?P<ours>Masked\w+) \+ DSDScheduler\(block=\(64, 64\)\), (?P<s>\d+)% of "
                    r"tiles, batch (?P<batch>.+?), one thread$")


def _ratio(result: dict, key: str) -> float:
    return result["time_vs_dense_step"][key]


def _memory(result: dict, key: str) -> float:
    sizes = result["state_bytes"]
    return sizes[key] / sizes["dense step"]


def training_rows(results: list[dict]) -> list[tuple[str, dict, dict]]:
    """(row label, {optimizer: time / dense}, {optimizer: memory / dense}) per row, in the models'
    order; optimizer "sgd" or "adamw"."""
    rows: dict[str, tuple[dict, dict]] = {}

    def put(label, opt, ratio, memory):
        times, mems = rows.setdefault(label, ({}, {}))
        times[opt], mems[opt] = ratio, memory

    for r in results:
        name = r["case"]
        if m := _UNSTRUCTURED.match(name):
            opt = "sgd" if m["opt"].startswith("SGD") else "adamw"
            model = m["model"]
            put(f"{model}: MaskedSGD / MaskedAdamW, 50% unstructured, batch {m['batch']}", opt,
                _ratio(r, "ours [auto]"), _memory(r, "ours"))
            for peer, label in ((PRUNE, "`torch.nn.utils.prune.l1_unstructured`, 50%"),
                                (SPARSIFIER, "`torch.ao.pruning.WeightNormSparsifier` (1x1 blocks), 50%")):
                if peer in r["time_vs_dense_step"]:
                    put(f"{model}: {label}", opt, _ratio(r, peer), _memory(r, peer))
        elif m := _ONE_PASS.match(name):
            opt = "sgd" if m["opt"].startswith("SGD") else "adamw"
            model = m["model"]
            put(f"{model}: torch optimizer + DSDScheduler masks (OptimizerMasks, one pass), 50%", opt,
                _ratio(r, "ours [auto]"), _memory(r, "ours"))
            put(f"{model}: the same with two passes (`elementwise=False`), in the same run", opt,
                _ratio(r, TWO_PASSES), _memory(r, "ours"))
        elif m := _BLOCK.match(name):
            opt = "sgd" if m["ours"] == "MaskedSGD" else "adamw"
            put(f"{m['model']}: block DSD, `DSDScheduler(block=(64, 64))`, {m['s']}% of tiles, batch {m['batch']}",
                opt, _ratio(r, "ours [auto]"), _memory(r, "ours"))
    return [(label, times, mems) for label, (times, mems) in rows.items()]


def training_table(results: list[dict]) -> str:
    def cell(values, key, fmt):
        return fmt.format(values[key]) if key in values else "-"
    lines = ["| sparse phase | SGD(momentum=0.9): time / dense | AdamW: time / dense | memory / dense (SGD / AdamW) |",
             "|---|---|---|---|"]
    for label, times, mems in training_rows(results):
        lines.append(f"| {label} | {cell(times, 'sgd', '{:.3f}x')} | {cell(times, 'adamw', '{:.3f}x')} | "
                     f"{cell(mems, 'sgd', '{:.3f}x')} / {cell(mems, 'adamw', '{:.3f}x')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- README's headline figures
def _find(results: list[dict], op: str, case: str) -> dict:
    for r in results:
        if r["op"] == op and r["case"] == case:
            return r
    raise KeyError(f"no result {op!r} / {case!r}")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def _ours(r: dict) -> float:
    return r["ours_s"][r["best_backend"]]


def _speedup(r: dict, backend: str | None = None) -> float:
    return r["speedup_vs_best_baseline"][backend or r["best_backend"]]


def _fraction(r: dict, reference: str, backend: str | None = None) -> float:
    return r["ours_fraction_of_reference_GBps"][reference][backend or r["best_backend"]]


def _device(environment: dict) -> str:
    """The machine of a results file, with the vector ISA our C++ kernels ran (CPU files)."""
    if environment.get("device") != "cpu":
        return environment.get("gpu", environment.get("device", "?")).replace("NVIDIA ", "")
    isa = environment.get("cpp_cpu_capability") or environment.get("cpp_masked_linear_tiles")
    label = {"avx512": "AVX-512", "avx2": "AVX2 only"}.get(isa, isa or "?")
    return f"{environment.get('cpu_threads')}-core {environment.get('machine', 'x86_64').replace('_', '-')} CPU, {label}"


def _headline_rows(files: dict) -> list[tuple[str, str, str, str]]:
    """(case, device, ours, ratio) of README's headline table, each figure read from `files`
    ({file name: its JSON})."""
    cpu, avx2 = files["cpu-2core-x86_64.json"], files["cpu-x86_64-avx2.json"]
    training, gpu = files["training-cpu-2core-x86_64-avx2.json"], files["NVIDIA-H200.json"]
    rows = []

    def row(case, source, ours, ratio):
        rows.append((case, _device(source["environment"]), ours, ratio))

    c = cpu["results"]
    r = _find(c, "magnitude_thresholds", "64M fp32 k=N/2")
    row("thresholds, 64M fp32", cpu, f"{_ms(_ours(r))} ms", f"{_speedup(r):.1f}x `torch.kthvalue`")
    r = _find(c, "magnitude_masks", "ResNet-50 weights (25.5M, 54 layers)")
    row("masks, ResNet-50 weights (54 layers)", cpu, f"{_ms(_ours(r))} ms",
        f"{_speedup(r):.1f}x per-layer kthvalue + compare")
    r = _find(c, "nm_masks", "2:4 of 4096x4096 fp32")
    row("2:4 masks, 4096x4096 fp32", cpu,
        f"{_ms(_ours(r))} ms, {_ours(r) / r['references_s']['torch.abs(w, out=buf)']:.2f}x one `abs` pass",
        f"{_speedup(r):.0f}x `abs().view(-1, 4).topk(2)` + scatter")
    r = _find(c, "masked_sgd_", "gpt2-small (124.4M params, 50% masks)")
    row("masked SGD step, GPT-2 small (124M, 50% masks)", cpu,
        f"{_ms(_ours(r))} ms, {_fraction(r, 'add_ in place (2 reads + 1 write)'):.0%} of in-place `add_` bandwidth",
        f"{_speedup(r):.2f}x `SGD(fused=True)` + mask multiplies")
    r = _find(c, "MaskedAdamW.step", "gpt2-small (124.4M params, 50% masks)")
    row("masked AdamW step, fused bits, GPT-2 small", cpu, f"{_ms(_ours(r))} ms",
        f"{_speedup(r):.2f}x `AdamW(fused=True)` + mask multiplies")
    host = [x for x in c if x["op"] == "host-bound step"]
    times, ratios = [_ours(x) for x in host], [1 / _speedup(x) for x in host]
    row(f"host-bound step, 148 small tensors, one thread", cpu, f"{_ms(min(times))}-{_ms(max(times))} ms",
        f"{min(ratios):.2f}-{max(ratios):.2f}x the time of torch's fused step of the same optimizer")
    case = "512x1024->1024 64x64 blocks 90% float32"
    r = _find(c, "masked_linear step", case)
    row("masked_linear step, 64x64 blocks 90% pruned, 512x1024->1024 fp32", cpu, "",
        f"{r['baselines_s']['dense: the three matmuls'] / _ours(r):.1f}x dense MKL, "
        f"{r['baselines_s']['dense oneDNN: the three matmuls'] / _ours(r):.1f}x dense oneDNN")
    r = _find(avx2["results"], "masked_linear step", case)
    row("masked_linear step, 64x64 blocks 90% pruned, 512x1024->1024 fp32", avx2, f"{_ms(_ours(r))} ms",
        f"{r['baselines_s']['dense: the three matmuls'] / _ours(r):.2f}x dense MKL")
    r = _find(avx2["results"], "mask_update", next(x["case"] for x in avx2["results"] if x["op"] == "mask_update"))
    reference = next(iter(r["references_s"].values()))
    row("RigL mask update, ResNet-50 weights, 80% sparse, 30% moved", avx2,
        f"{_ms(_ours(r))} ms, {_ours(r) / reference:.1f}x one `abs` pass over weights and gradients",
        f"{_speedup(r):.1f}x per-layer `torch.topk`")
    t = training["results"]
    block = [_find(t, "training step", f"MLP stack, {o} + DSDScheduler(block=(64, 64)), 90% of tiles, batch 256, "
                                      f"one thread")["time_vs_dense_step"]["ours [auto]"]
             for o in ("MaskedSGD", "MaskedAdamW")]
    row("whole training step, block DSD 90% of 64x64 tiles, MLP stack (18.9M), MaskedSGD / MaskedAdamW, batch 256",
        training, f"{block[0]:.3f}x / {block[1]:.3f}x the dense step's time",
        f"{1 / block[0]:.1f}x / {1 / block[1]:.1f}x faster than dense")
    r = _find(t, "training step", "MLP stack, AdamW + DSDScheduler masks (OptimizerMasks: one pass), 50% unstructured, "
                                  "batch 64, one thread")
    row("whole training step, AdamW through DSDScheduler masks (one pass), 50% unstructured, batch 64", training,
        f"{r['time_vs_dense_step']['ours [auto]']:.3f}x the dense step's time",
        f"two passes: {r['time_vs_dense_step'][TWO_PASSES]:.3f}x")
    g = gpu["results"]
    sgd = [_find(g, "masked_sgd_", f"{m} (25.6M params, 50% masks)" if m == "resnet50" else
                 f"{m} (124.4M params, 50% masks)") for m in ("resnet50", "gpt2-small")]
    row("masked SGD step (Triton), ResNet-50 / GPT-2 small", gpu,
        f"{_ms(sgd[0]['ours_s']['triton'])} / {_ms(sgd[1]['ours_s']['triton'])} ms wall",
        f"{_speedup(sgd[0], 'triton'):.2f}x / {_speedup(sgd[1], 'triton'):.2f}x `SGD(fused=True)` + float-mask "
        f"multiplies")
    adamw = [_find(g, "masked_adamw_", f"{m} (25.5M params, 50% masks)" if m == "resnet50" else
                   f"{m} (124.4M params, 50% masks)") for m in ("resnet50", "gpt2-small")]
    row("masked AdamW step (Triton), ResNet-50 / GPT-2 small", gpu,
        f"{_ms(adamw[0]['ours_s']['triton'])} / {_ms(adamw[1]['ours_s']['triton'])} ms wall, "
        f"{_fraction(adamw[1], 'copy_ (read + write)', 'triton'):.0%} of `copy_` bandwidth (GPT-2)",
        f"{_speedup(adamw[0], 'triton'):.2f}x / {_speedup(adamw[1], 'triton'):.2f}x `AdamW(fused=True)` + "
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
        return _find(results, op, case)
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
    ("RigL mask update, ResNet-50 weights (80% sparse, 30% moved), time / one abs pass over weights and gradients",
     "<= 3x", _mask_update),
]
# the capability files, in the table's column order
CAPABILITY_FILES = ("cpu-2core-x86_64.json", "cpu-x86_64-avx2.json")


def capabilities_table(files: dict) -> str:
    """docs/benchmarks.md's CPU targets on each vector capability: one column per results file of
    CAPABILITY_FILES (headed by its machine, capability and date), the C++ backend's figures."""
    sources = [files[name] for name in CAPABILITY_FILES]
    heads = [f"{_device(f['environment'])}, {f['environment'].get('date', '?')}" for f in sources]
    lines = ["| case | target | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(sources)]
    for what, target, figure in CAPABILITY_ROWS:
        cells = [figure(f["results"]) or "not measured" for f in sources]
        lines.append(f"| {what} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cases_rows(results: list[dict]):
    """(op, case, C++, torch composite, best baseline, ratio) of every result but masked_linear's
    (its own table) and the whole-step ones (theirs)."""
    for r in results:
        if r["op"].startswith("masked_linear") or "ours_s" not in r:
            continue
        ours = r["ours_s"]
        cpp = ours.get("cpp")
        base = r.get("best_baseline")
        gbps = r.get("ours_GBps", {}).get("cpp")
        cpp_cell = "" if cpp is None else f"{_ms(cpp)} ms" + ("" if gbps is None else f" ({gbps:.1f} GB/s)")
        torch_cell = "" if ours.get("torch") is None else f"{_ms(ours['torch'])} ms"
        base_cell = "" if base is None else f"{base} {_ms(r['baselines_s'][base])} ms"
        ratio = r.get("speedup_vs_best_baseline", {}).get("cpp")
        yield (r["op"], r["case"], cpp_cell, torch_cell, base_cell, "" if ratio is None else f"{ratio:.2f}x")


def cases_table(results: list[dict]) -> str:
    """Every case of a CPU results file but masked_linear's: ours on each backend, the best torch
    baseline of the same run, and the ratio (the baseline's time / the C++ backend's)."""
    lines = ["| op | case | ours: C++ | ours: torch composite | best torch baseline | ratio (C++) |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _cases_rows(results)]
    return "\n".join(lines)


def gpu_cases_table(results: list[dict]) -> str:
    """Every case of a GPU results file: ours per backend (wall, and the GPU's busy time where
    measured), the best torch baseline of the same run (wall / GPU), and the best backend's ratio."""
    def timed(seconds: float, device: float | None) -> str:
        return f"{_ms(seconds)} ms" + ("" if device is None else f" / {_ms(device)} ms")

    lines = ["| op | case | ours: Triton | ours: CUDA (C++ backend) | best torch baseline | ratio, wall (best of ours) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ours, dev = r["ours_s"], r.get("ours_device_s", {})
        cells = [timed(ours[b], dev.get(b)) if b in ours else "" for b in ("triton", "cpp")]
        base = r["best_baseline"]
        base_cell = f"{base} {timed(r['baselines_s'][base], r.get('baselines_device_s', {}).get(base))}"
        lines.append(f"| {r['op']} | {r['case']} | " + " | ".join(cells) +
                     f" | {base_cell.replace('|', chr(92) + '|')} | {_speedup(r):.2f}x ({r['best_backend']}) |")
    return "\n".join(lines)


_PASSES = ("masked_linear", "masked_linear dX", "masked_linear dW", "masked_linear step")
_DENSE = {"masked_linear": ("dense F.linear(x, W)", "dense oneDNN linear(x, W)"),
          "masked_linear dX": ("dense dY @ W", "dense oneDNN dY @ W"),
          "masked_linear dW": ("dense dY^T @ X", "dense oneDNN dY^T @ X"),
          "masked_linear step": ("dense: the three matmuls", "dense oneDNN: the three matmuls")}


def masked_linear_table(results: list[dict]) -> str:
    """masked_linear's C++ passes per layer and mask: ours in ms, then how many times faster than
    dense MKL (what a torch user calls) / dense oneDNN (torch's fastest dense fp32 matmul on CPU)
    / the MKL products on W*M."""
    by_case: dict = {}
    for r in results:
        if r["op"] in _PASSES and "cpp" in r["ours_s"]:
            by_case.setdefault(r["case"].removesuffix(" float32"), {})[r["op"]] = r
    lines = ["| layer (tokens x in -> out), mask | forward | dX | dW | step |", "|---|---|---|---|---|"]
    for case, passes in by_case.items():
        cells = []
        for op in _PASSES:
            r = passes.get(op)
            if r is None:
                cells.append("")
                continue
            ours = r["ours_s"]["cpp"]
            mkl, onednn = (r["baselines_s"][k] / ours for k in _DENSE[op])
            masked = next(k for k in r["baselines_s"] if k not in _DENSE[op])
            cells.append(f"{_ms(ours)} ms: {mkl:.2f}x / {onednn:.2f}x / {r['baselines_s'][masked] / ours:.2f}x")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adamw_cpu_table(results: list[dict]) -> str:
    """docs/optimizers.md's CPU table: MaskedAdamW's two flavours against AdamW + multiplies, with
    the memory bandwidth of a copy_ and an in-place add_ timed in the same rounds."""
    lines = ["| parameter set | MaskedAdamW() (foreach bits) | MaskedAdamW(fused=True) | AdamW(fused=True) + "
             "multiplies | AdamW(foreach=True) + multiplies | copy_ / in-place add_ |", "|---|---|---|---|---|---|"]
    for key, label in (("resnet50 (25.5M params, 50% masks)", "ResNet-50 (25.5M)"),
                       ("gpt2-small (124.4M params, 50% masks)", "GPT-2 small (124.4M)")):
        default, fused = _find(results, "masked_adamw_", key), _find(results, "MaskedAdamW.step", key)

        def cell(r):
            return f"{_ms(_ours(r))} ms, {r['ours_GBps'][r['best_backend']]:.0f} GB/s, {_speedup(r):.2f}x"
        base = fused["baselines_s"]
        refs = fused["references_GBps"]
        lines.append(f"| {label} | {cell(default)} | {cell(fused)} | "
                     f"{_ms(base['AdamW(fused=True) + mask multiplies'])} ms | "
                     f"{_ms(base['AdamW(foreach=True) + mask multiplies'])} ms | "
                     f"{refs['copy_ (read + write)']:.0f} / {refs['add_ in place (2 reads + 1 write)']:.0f} GB/s |")
    return "\n".join(lines)


def _study_table(study: dict) -> str:
    from ..study import cells_table
    return cells_table(study)


def _run_tables(report: dict) -> str:
    from ..report import summary_tables
    return summary_tables(report)


# name -> (what it is made from: "results", a bench file's results list, or "report", a train
# job's report.json; the table)
TABLES = {"training": ("results", training_table), "default-run": ("report", _run_tables),
          "sparse-run": ("report", _run_tables), "headline": ("folder", headline_table),
          "adamw-cpu": ("results", adamw_cpu_table), "capabilities": ("folder", capabilities_table),
          "cases": ("results", cases_table), "masked-linear": ("results", masked_linear_table),
          "study": ("report", _study_table), "gpu-cases": ("results", gpu_cases_table)}


def table_from_file(name: str, path: str) -> str:
    """The table `name` written from the file at `path`."""
    source, make = TABLES[name]
    if source == "folder":  # every results JSON of the folder, by file name
        import glob
        import os
        files = {}
        for file in sorted(glob.glob(os.path.join(path, "*.json"))):
            with open(file) as f:
                files[os.path.basename(file)] = json.load(f)
        return make(files)
    with open(path) as f:
        data = json.load(f)
    return make(data["results"] if source == "results" else data)


def replace_table(page: str, name: str, table: str) -> str:
    """`page` with the text between its markers for `name` replaced by `table`."""
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    if start not in page or end not in page:
        raise ValueError(f"the page has no {start} ... {end} markers")
    head, rest = page.split(start, 1)
    return f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}"


def table_on_page(page: str, name: str) -> str:
    """The text between the page's markers for `name`."""
    return page.split(f"<!-- table:{name} -->", 1)[1].split(f"<!-- /table:{name} -->", 1)[0].strip("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("results", help="a bench results JSON, a train job's report.json, or (headline) the "
                                        "folder of results JSON")
    parser.add_argument("--write", metavar="PAGE", help="replace the table between the page's markers")
    parser.add_argument("--marker", help="the markers' name (default: the table's; a page holding one kind of "
                                         "table from two files names each, e.g. cases@cpu-x86_64-avx2)")
    args = parser.parse_args(argv)
    table = table_from_file(args.table, args.results)
    if args.write:
        with open(args.write) as f:
            page = f.read()
        with open(args.write, "w") as f:
            f.write(replace_table(page, args.marker or args.table, table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
