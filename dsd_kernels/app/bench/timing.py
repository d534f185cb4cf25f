"""How `dsd-kernels bench` and benchmarks/bench_*.py time a case and write its results.

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

from ..._files import atomic_write_text


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
    notes: dict = field(default_factory=dict)  # more facts of the case, copied into its result


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




def single_threaded(fn: Callable[[], object]) -> Callable[[], None]:
    """fn run on one thread (the thread count put back after): the steps a user's single-threaded
    loop takes, timed without the second core's help."""
    def call():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return call


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
                "masked_adamw_": "masked_adamw", "host-bound step": "masked_sgd", "nm_masks": "nm_masks"}


def benchmark_backends(device: str, op: str | None = None) -> list[str]:
    """Our backends worth timing for `op` on `device` (all ops when None): the registry's
    rows that auto may choose there and that can run here, fallbacks included (on CPU:
    cpp and torch; the Triton interpreter is a correctness tool, not a benchmark)."""
    from ... import _backend
    device_type = torch.device(device).type
    if op == "training step":  # a whole step runs every op: under the registry's own choices
        return [_backend.get_backend()]
    ops = [_REGISTRY_OP.get(op, op)] if op is not None else list(dict.fromkeys(_REGISTRY_OP.values()))
    found = []
    for name in ops:
        for row in _backend.rows_for(name, device_type):
            if row.auto and _backend.row_status(row, device_type)[0] and row.backend not in found:
                found.append(row.backend)
    return found


ROUNDS = 3  # alternating timing rounds per case (see run_case)
DENSE_STEP = "dense step"  # the baseline a training-step case is measured against


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
    from ... import _backend
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
    if DENSE_STEP in base:  # whole training steps: every time as a multiple of the dense step's
        out["time_vs_dense_step"] = {**{f"ours [{b}]": t / base[DENSE_STEP] for b, t in ours.items()},
                                     **{k: t / base[DENSE_STEP] for k, t in base.items() if k != DENSE_STEP}}
    out.update(case.notes)
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
        # the vector width torch's own CPU kernels run at here (AVX2, AVX512, ...): figures differ by it
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    from ... import _backend
    info["backend"] = _backend.get_backend()
    info["available_backends"] = _backend.available_backends()
    if "cpp" in info["available_backends"]:  # the masked_linear timings depend on it
        info["cpp_masked_linear_tiles"] = torch.ops.dsd_kernels_cpp.masked_linear_tile_kernel()
        # the ISA our C++ CPU kernels ran (DSD_KERNELS_CPU_CAPABILITY can lower it below the CPU's)
        info["cpp_cpu_capability"] = torch.ops.dsd_kernels_cpp.cpu_capability()
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
    if r.get("time_vs_dense_step"):
        lines.append("    time / dense step: " + ", ".join(f"{k} {v:.3f}x" for k, v in r["time_vs_dense_step"].items()))
    for k, v in r.get("references_s", {}).items():
        fractions = ", ".join(f"{b} {f:.0%}" for b, f in r["ours_fraction_of_reference_GBps"][k].items())
        lines.append(f"    reference: {k:<39} {v * 1e3:10.3f} ms {r['references_GBps'][k]:8.2f} GB/s"
                     f"  (ours at {fractions} of it)")
    if r.get("ours_device_s"):
        busy = {**{f"ours [{b}]": t for b, t in r["ours_device_s"].items()}, **r["baselines_device_s"]}
        lines.append("    GPU busy per call: " + ", ".join(
            f"{k} {t * 1e3:.3f} ms" if t else f"{k} ?" for k, t in busy.items()))
    return "\n".join(lines)
