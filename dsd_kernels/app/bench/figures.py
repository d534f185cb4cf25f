"""What the generated tables read from a results file: a case by op and name, times in ms, our
best backend's time and ratio, and the machine a file was measured on (tables.py)."""
from __future__ import annotations


def find(results: list[dict], op: str, case: str) -> dict:
    for r in results:
        if r["op"] == op and r["case"] == case:
            return r
    raise KeyError(f"no result {op!r} / {case!r}")


def ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.3g}"


def ours(r: dict) -> float:
    return r["ours_s"][r["best_backend"]]


def speedup(r: dict, backend: str | None = None) -> float:
    return r["speedup_vs_best_baseline"][backend or r["best_backend"]]


def fraction(r: dict, reference: str, backend: str | None = None) -> float:
    return r["ours_fraction_of_reference_GBps"][reference][backend or r["best_backend"]]


def device(environment: dict) -> str:
    """The machine of a results file, with the vector ISA our C++ kernels ran (CPU files)."""
    if environment.get("device") != "cpu":
        return environment.get("gpu", environment.get("device", "?")).replace("NVIDIA ", "")
    isa = environment.get("cpp_cpu_capability") or environment.get("cpp_masked_linear_tiles")
    label = {"avx512": "AVX-512", "avx2": "AVX2 only"}.get(isa, isa or "?")
    return f"{environment.get('cpu_threads')}-core {environment.get('machine', 'x86_64').replace('_', '-')} CPU, {label}"


