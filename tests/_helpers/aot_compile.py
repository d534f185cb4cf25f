"""Run by tests/test_aot.py in a process without TRITON_INTERPRET (the interpreter's
@triton.jit functions cannot be compiled): the Triton kernels of the GPU path, compiled ahead of time for sm_80 and sm_90 on this CPU
machine (`pytest -m aot`): the interpreter accepts code real GPUs reject, so every kernel the
multi-tensor launchers issue is compiled with the constants they pass on a GPU, and ptxas -v
(bundled with triton) reports its registers and spills.

Checked by the test: no compile error, no spill and shared memory within the target's limit,
for every kernel. `python -m tests._helpers.aot_compile masked_linear` compiles one family alone.
"""
import json
import re
import subprocess
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 64)}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
KEY_TYPES = {"fp32": (tl.float32, tl.int32, tl.int32, 0x7FFFFFFF, 0x7F800001, 31),
             "bf16": (tl.bfloat16, tl.int16, tl.int32, 0x7FFF, 0x7F81, 15),
             "fp64": (tl.float64, tl.int64, tl.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001, 63)}


def compile_kernel(fn, pointers: dict, scalars: dict, constexprs: dict, target: str, **options):
    """options: what the launcher passes besides the arguments (num_warps, ...)."""
    signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=TARGETS[target], options=options or None)


def ptxas_report(compiled, target: str) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel, from the bundled ptxas -v."""
    from triton.backends.nvidia import compiler as nv
    arch = int(target[3:])
    ptxas = nv.get_ptxas(arch).path
    out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                          "-o", "/dev/null", "-"], input=compiled.asm["ptx"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    registers = max((int(m) for m in re.findall(r"Used (\d+) registers", out.stderr)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                        out.stderr))
    return registers, spills


def multi_tensor_kernels():
    from dsd_kernels.backends.triton import apply_masks as A
    from dsd_kernels.backends.triton import magnitude_select as M
    from dsd_kernels.backends.triton import masked_adamw as W
    from dsd_kernels.backends.triton import masked_sgd as S
    from dsd_kernels.backends.triton import nm_masks as N
    i64 = {"SEG_META": "*i64", "TILES": "*i64"}
    for name, (value, bits, key, abs_mask, nan_key, key_bits) in KEY_TYPES.items():
        keys = dict(VALUE_TYPE=value, BITS_TYPE=bits, KEY_TYPE=key, ABS_MASK=abs_mask, NAN_KEY=nan_key,
                    TILE_WORDS=64)
        yield (f"histogram {name}", M._histogram_kernel, {**i64, "STATE": "*i64", "HIST": "*i64"}, {},
               {**keys, "SHIFT": key_bits - 11, "DIGIT_BITS": 11})
        yield f"tie_count {name}", M._tie_count_kernel, {**i64, "STATE": "*i64", "TILE_TIES": "*i64"}, {}, keys
        yield f"mask {name}", M._mask_kernel, {**i64, "STATE": "*i64", "TIES_BEFORE": "*i64"}, {}, keys
        compute = tl.float64 if name == "fp64" else tl.float32
        for momentum, nesterov in ((False, False), (True, False), (True, True)):
            yield (f"masked_sgd {name} momentum={momentum} nesterov={nesterov}", S._masked_sgd_kernel,
                   {**i64, "HYPER": "*fp64"}, {},
                   dict(VALUE_TYPE=value, COMPUTE_TYPE=compute, MOMENTUM=momentum, NESTEROV=nesterov,
                        MAXIMIZE=True, WEIGHT_DECAY=True, TILE_WORDS=S.GPU_TILE_WORDS))
        yield f"apply_masks {name}", A._apply_masks_kernel, i64, {}, dict(VALUE_TYPE=value, TILE_WORDS=A.GPU_TILE_WORDS)
        for n, m in ((2, 4), (5, 32)):  # the common pattern and the longest group (most unrolled)
            yield (f"nm_masks {name} {n}:{m}", N._nm_masks_kernel, {"X": f"*{name}", "WORDS": "*i32"},
                   {"cols": "i64", "words_per_row": "i64"},
                   dict(VALUE_TYPE=value, BITS_TYPE=bits, KEY_TYPE=key, ABS_MASK=abs_mask, NAN_KEY=nan_key, N=n, M=m,
                        BLOCK_WORDS=N.GPU_BLOCK_WORDS))
        if name in ("fp32", "fp64"):  # the Triton AdamW row serves these two
            for amsgrad, small_weight in ((False, True), (True, False)):
                yield (f"masked_adamw {name} amsgrad={amsgrad} small_weight={small_weight}",
                       W._masked_adamw_kernel, {**i64, "HYPER": "*fp64", "STEPS": "*fp64"}, {},
                       dict(VALUE_TYPE=value, COMPUTE_TYPE=compute, AMSGRAD=amsgrad, MAXIMIZE=True,
                            WEIGHT_DECAY=True, SMALL_WEIGHT=small_weight, FP64=name == "fp64", CUDA_FOREACH=True,
                            TILE_WORDS=W.GPU_TILE_WORDS))
    yield "select", M._select_kernel, {"STATE": "*i64", "HIST": "*i64"}, {}, dict(DIGIT_BITS=11)


def masked_linear_kernels():
    """Every specialisation the launchers issue: fp16/bf16, and fp32 both exact (torch's default)
    and tf32 (torch.backends.cuda.matmul.allow_tf32); forward and dX in every (rows, warps)
    candidate of autotuning (the static choices among them), dW in every warp count. The sixth
    field: num_warps (None: the static launch options for the program's rows)."""
    from dsd_kernels.backends.triton import masked_linear as L
    for dtype, ieee in (("fp32", True), ("fp32", False), ("fp16", False), ("bf16", False)):
        pointer = "*" + dtype
        label = f"{dtype}{' ieee' if ieee else ' tf32' if dtype == 'fp32' else ''}"
        common = dict(UPCAST=False, IEEE=ieee, STEP=L.reduction_step(ieee))
        sizes = {"M": "i64", "N": "i64", "K": "i64", "words_per_row": "i64"}
        for block_m, warps in L.row_candidates(ieee):
            rows = f" BLOCK_M={block_m} warps={warps}"
            yield (f"masked_linear forward {label}{rows}", L._forward_kernel,
                   {"X": pointer, "W": pointer, "WORDS": "*i32", "BIAS": pointer, "Y": pointer,
                    "ROW_PTR": "*i64", "COL_IDX": "*i64"}, sizes,
                   {**common, "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": L.BLOCK_N, "BLOCK_K": L.BLOCK_K},
                   warps)
            yield (f"masked_linear grad_input {label}{rows}", L._grad_input_kernel,
                   {"DY": pointer, "W": pointer, "WORDS": "*i32", "DX": pointer, "COL_PTR": "*i64",
                    "ROW_IDX": "*i64"}, sizes,
                   {**common, "BLOCK_M": block_m, "BLOCK_N": L.BLOCK_N, "HALF_K": L.HALF_K}, warps)
        for warps in L.GRAD_WEIGHT_WARPS:
            yield (f"masked_linear grad_weight {label} warps={warps}", L._grad_weight_kernel,
                   {"DY": pointer, "X": pointer, "WORDS": "*i32", "DW": pointer, "TILE_KEPT": "*i32"},
                   {**sizes, "tiles_k": "i64"}, {**common, "BLOCK_N": L.BLOCK_N, "BLOCK_K": L.BLOCK_K}, warps)


def main() -> int:
    """One JSON line per (kernel, target): registers, spill bytes, shared bytes, or the error."""
    only = sys.argv[1] if len(sys.argv) > 1 else None  # a family alone, e.g. masked_linear
    cases = [(c + (None,), "multi_tensor") for c in multi_tensor_kernels() if only in (None, "multi_tensor")] + \
        [(c, "masked_linear") for c in masked_linear_kernels() if only in (None, "masked_linear")]
    from dsd_kernels.backends.triton._tiles import TABLE_NUM_WARPS
    for (name, fn, pointers, scalars, constexprs, warps), family in cases:
        from dsd_kernels.backends.triton.masked_linear import launch_options as linear_launch_options
        options = {"num_warps": TABLE_NUM_WARPS}
        if name.startswith("masked_adamw"):
            from dsd_kernels.backends.triton.masked_adamw import LAUNCH_OPTIONS
            options = dict(LAUNCH_OPTIONS)
        if name.startswith("nm_masks"):
            from dsd_kernels.backends.triton.nm_masks import NUM_WARPS
            options = {"num_warps": NUM_WARPS}
        for target in TARGETS:
            row = {"kernel": name, "family": family, "target": target}
            if family == "masked_linear":  # the launcher's options for a GPU of this capability
                options = linear_launch_options((int(target[3]), int(target[4])),
                                                constexprs.get("BLOCK_M", 64))
                options["num_warps"] = warps
            try:
                compiled = compile_kernel(fn, pointers, scalars, constexprs, target, **options)
                row["registers"], row["spills"] = ptxas_report(compiled, target)
                row["shared"] = compiled.metadata.shared
                row["shared_limit"] = SHARED_LIMIT[target]
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
