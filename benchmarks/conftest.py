"""pytest-benchmark runs of the cases in dsd_kernels.app.bench (our op under the backend that
DSD_KERNELS_BACKEND selects, default auto).

    pytest benchmarks/bench_magnitude_select.py --benchmark-group-by=param:case

Each case's op and torch baselines land in one group, so the table compares them in
the same run. `dsd-kernels bench` runs the same cases and writes ratios + GB/s to
benchmarks/results/<device>.json.
"""
import torch

import dsd_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(benchmark, case, impl):
    fn = case.ours if impl == "ours" else case.baselines[impl]
    if DEVICE == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        timed = fn
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark.group = f"{case.op}: {case.name}"
    benchmark(timed)
    if not benchmark.disabled:  # --benchmark-disable: one plain call, no timings to report
        benchmark.extra_info["GBps"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["backend"] = dsd_kernels.get_backend()
