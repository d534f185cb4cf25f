"""Predicted GPU times of the bench's GPU cases (`dsd-kernels bench --predict h100|a100|h200`).

Per op and case: the bytes the kernels that auto runs on a GPU must move, the FLOPs they must
do, their launches (kernels and host-to-device table copies per call), and the time those take
at the device's peak memory bandwidth and dense bf16 FLOP rate, whichever is longer (a
roofline; launch latency and host time are not in it). These are predictions: nothing here
runs a kernel, and they are printed apart from, and never written into, the measured results.

Where the counts come from: the module docstrings of triton/ and csrc/cuda/ (each states its
launches and bytes per call); tests/test_cost_model.py counts the Triton launches under the
interpreter against the figures here.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

from .cases import (BLOCK_SPARSITIES, GPU_LINEAR_SHAPES, THRESHOLD_SIZES_M, gpt2_small_param_shapes,
                           resnet50_sgd_shapes, resnet50_weight_shapes)


@dataclass(frozen=True)
class Peak:
    name: str
    bytes_per_s: float  # HBM bandwidth
    bf16_flops_per_s: float  # dense bf16 tensor-core rate


PEAKS = {
    "h100": Peak("H100 SXM (3.35 TB/s HBM3, 989 TFLOP/s dense bf16)", 3.35e12, 989e12),
    "a100": Peak("A100 80GB (2.0 TB/s HBM2e, 312 TFLOP/s dense bf16)", 2.0e12, 312e12),
    "h200": Peak("H200 (4.8 TB/s HBM3e, 989 TFLOP/s dense bf16)", 4.8e12, 989e12),
}

# launches per call of the kernels auto takes on a GPU (kernels, host-to-device copies)
SELECTION_PASSES = {"fp32": 3}  # radix passes over 31 key bits (float_keys.h)
THRESHOLD_LAUNCHES = (2 * SELECTION_PASSES["fp32"] + 3, 1)  # csrc/cuda: 2 per pass + 3 fills
MASK_LAUNCHES = (2 * SELECTION_PASSES["fp32"] + 4 + 3, 1)  # + tie count, cumsum, subtraction, mask
SGD_LAUNCHES = (1, 1)  # csrc/cuda/masked_sgd.cu: one kernel and one table per dtype
ADAMW_LAUNCHES = (1, 1)  # backends/triton/masked_adamw.py: one kernel; the step table (segment and
# hyper-parameter tables are built once per layout and kept)
APPLY_MASKS_LAUNCHES = (1, 0)  # backends/triton/apply_masks.py (its segment table kept per layout)
LINEAR_FORWARD_LAUNCHES = (1, 0)  # backends/triton/masked_linear.py (tile lists cached per mask version)
TILE = 64


@dataclass(frozen=True)
class Work:
    op: str
    case: str
    kernels: str  # which implementation the counts are of
    bytes: int
    flops: int
    launches: tuple[int, int]  # (kernels, host-to-device copies)

    def seconds(self, peak: Peak) -> float:
        return max(self.bytes / peak.bytes_per_s, self.flops / peak.bf16_flops_per_s)

    def bound(self, peak: Peak) -> str:
        return "memory" if self.bytes / peak.bytes_per_s >= self.flops / peak.bf16_flops_per_s else "compute"


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _masked_numel(shapes) -> int:  # the bench masks every tensor of 2 or more dims
    return _numel([s for s in shapes if len(s) >= 2])


def selection_work() -> list[Work]:
    out = []
    for m in THRESHOLD_SIZES_M:
        n = m * 2**20
        out.append(Work("magnitude_thresholds", f"{m}M fp32 k=N/2", "csrc/cuda",
                        SELECTION_PASSES["fp32"] * n * 4, 0, THRESHOLD_LAUNCHES))
    shapes = resnet50_weight_shapes()
    n = _numel(shapes)
    name = f"ResNet-50 weights ({n / 1e6:.1f}M, {len(shapes)} layers)"
    histograms = len(shapes) * 2048 * 8 * 2 * SELECTION_PASSES["fp32"]  # added to, then read
    out.append(Work("magnitude_thresholds", name, "csrc/cuda", SELECTION_PASSES["fp32"] * n * 4 + histograms, 0,
                    THRESHOLD_LAUNCHES))
    out.append(Work("magnitude_masks", name, "csrc/cuda",
                    (SELECTION_PASSES["fp32"] + 1) * n * 4 + n // 8 + histograms, 0, MASK_LAUNCHES))
    return out


def _optimizer_work(op: str, backend: str, resnet50_shapes, fp32_words: int, launches: int) -> list[Work]:
    """One step over ResNet-50's and GPT-2 small's parameters with 50% masks: fp32_words 4-byte
    reads and writes per element, plus the mask bits."""
    out = []
    for name, shapes in (("resnet50", resnet50_shapes), ("gpt2-small", gpt2_small_param_shapes())):
        n, masked = _numel(shapes), _masked_numel(shapes)
        out.append(Work(op, f"{name} ({n / 1e6:.1f}M params, 50% masks)", backend,
                        n * 4 * fp32_words + masked // 8, 0, launches))
    return out


def sgd_work() -> list[Work]:
    return _optimizer_work("masked_sgd_", "csrc/cuda", resnet50_sgd_shapes(), 5, SGD_LAUNCHES)


def adamw_work() -> list[Work]:
    return _optimizer_work("masked_adamw_", "triton", resnet50_weight_shapes(), 7, ADAMW_LAUNCHES)


def apply_masks_work() -> list[Work]:
    n = _masked_numel(gpt2_small_param_shapes())
    return [Work("apply_masks_", f"gpt2-small weights ({n / 1e6:.1f}M, 50% masks)", "triton",
                 n * 4 * 2 + n // 8, 0, APPLY_MASKS_LAUNCHES)]


def masked_linear_work() -> list[Work]:
    """The forward of the bench's GPU cases (bf16): x (M, K), W (N, K), kept = the fraction of
    64x64 tiles of the mask that keep anything (unstructured 50%: all of them)."""
    out = []
    e = 2
    kinds = [("unstructured 50%", 1.0)] + [(f"64x64 blocks {s:.0%}", 1 - s) for s in BLOCK_SPARSITIES]
    for tokens, k, n in GPU_LINEAR_SHAPES:
        for kind, kept in kinds:
            nbytes = int((tokens * k + n * k * kept + tokens * n) * e + n * k // 8)
            flops = int(2 * tokens * n * k * kept)
            out.append(Work("masked_linear", f"{tokens}x{k}->{n} {kind} bfloat16", "triton", nbytes, flops,
                            LINEAR_FORWARD_LAUNCHES))
    return out


SUITES = {"magnitude_select": selection_work, "masked_sgd": sgd_work, "masked_adamw": adamw_work,
          "apply_masks": apply_masks_work, "masked_linear": masked_linear_work}


def predict(device: str, suites=None) -> list[dict]:
    peak = PEAKS[device]
    rows = []
    for suite in suites or SUITES:
        for w in SUITES[suite]():
            rows.append({"op": w.op, "case": w.case, "kernels": w.kernels, "bytes": w.bytes, "flops": w.flops,
                         "kernel_launches": w.launches[0], "table_copies": w.launches[1],
                         "predicted_s": w.seconds(peak), "bound": w.bound(peak)})
    return rows


def format_predictions(device: str, rows: list[dict]) -> str:
    lines = [f"PREDICTED (roofline at peak, not measured) for {PEAKS[device].name}:",
             f"  {'op':<22} {'case':<48} {'kernels':<10} {'MB':>9} {'GFLOP':>9} {'launches':>9} "
             f"{'predicted':>12}  bound"]
    for r in rows:
        lines.append(f"  {r['op']:<22} {r['case'][:48]:<48} {r['kernels']:<10} {r['bytes'] / 1e6:9.1f} "
                     f"{r['flops'] / 1e9:9.2f} {r['kernel_launches']:>5}+{r['table_copies']:<3} "
                     f"{r['predicted_s'] * 1e6:9.1f} us  {r['bound']}")
    return "\n".join(lines)
