"""The tables of one results file: its cases, masked_linear's passes, the GPU cases, MaskedAdamW
on CPU and the whole training steps (tables.py registers them)."""
from __future__ import annotations

import re

from . import figures as F
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
        cpp_cell = "" if cpp is None else f"{F.ms(cpp)} ms" + ("" if gbps is None else f" ({gbps:.1f} GB/s)")
        torch_cell = "" if ours.get("torch") is None else f"{F.ms(ours['torch'])} ms"
        base_cell = "" if base is None else f"{base} {F.ms(r['baselines_s'][base])} ms"
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
        return f"{F.ms(seconds)} ms" + ("" if device is None else f" / {F.ms(device)} ms")

    lines = ["| op | case | ours: Triton | ours: CUDA (C++ backend) | best torch baseline | ratio, wall (best of ours) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ours, dev = r["ours_s"], r.get("ours_device_s", {})
        cells = [timed(ours[b], dev.get(b)) if b in ours else "" for b in ("triton", "cpp")]
        base = r["best_baseline"]
        base_cell = f"{base} {timed(r['baselines_s'][base], r.get('baselines_device_s', {}).get(base))}"
        lines.append(f"| {r['op']} | {r['case']} | " + " | ".join(cells) +
                     f" | {base_cell.replace('|', chr(92) + '|')} | {F.speedup(r):.2f}x ({r['best_backend']}) |")
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
            cells.append(f"{F.ms(ours)} ms: {mkl:.2f}x / {onednn:.2f}x / {r['baselines_s'][masked] / ours:.2f}x")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adamw_cpu_table(results: list[dict]) -> str:
    """docs/optimizers.md's CPU table: MaskedAdamW's two flavours against AdamW + multiplies, with
    the memory bandwidth of a copy_ and an in-place add_ timed in the same rounds."""
    lines = ["| parameter set | MaskedAdamW() (foreach bits) | MaskedAdamW(fused=True) | AdamW(fused=True) + "
             "multiplies | AdamW(foreach=True) + multiplies | copy_ / in-place add_ |", "|---|---|---|---|---|---|"]
    for key, label in (("resnet50 (25.5M params, 50% masks)", "ResNet-50 (25.5M)"),
                       ("gpt2-small (124.4M params, 50% masks)", "GPT-2 small (124.4M)")):
        default, fused = F.find(results, "masked_adamw_", key), F.find(results, "MaskedAdamW.step", key)

        def cell(r):
            return f"{F.ms(F.ours(r))} ms, {r['ours_GBps'][r['best_backend']]:.0f} GB/s, {F.speedup(r):.2f}x"
        base = fused["baselines_s"]
        refs = fused["references_GBps"]
        lines.append(f"| {label} | {cell(default)} | {cell(fused)} | "
                     f"{F.ms(base['AdamW(fused=True) + mask multiplies'])} ms | "
                     f"{F.ms(base['AdamW(foreach=True) + mask multiplies'])} ms | "
                     f"{refs['copy_ (read + write)']:.0f} / {refs['add_ in place (2 reads + 1 write)']:.0f} GB/s |")
    return "\n".join(lines)


