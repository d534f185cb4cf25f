"""`pytest -m aot`: every Triton kernel of the GPU path compiled ahead of time for sm_80 and sm_90
on this CPU machine (tests/_helpers/aot_compile.py, in a process without the interpreter), with the
constants and launch options the launchers pass on a GPU, by the installed Triton and by Triton
3.6 (the version that goes with torch 2.11, which users run; installed by this test into a
cache folder of its own, outside any environment, when absent). Fails on any compile error, any
register spill, or shared memory over the target's limit; prints registers per kernel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.aot, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
OLDER_TRITON = "3.6.0"


def triton_36_site() -> Path:
    """A folder holding triton OLDER_TRITON alone (pip --target), reused across runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsd-kernels" / f"triton-{OLDER_TRITON}"
    if not (cache / "triton" / "__init__.py").exists():
        out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(cache),
                              f"triton=={OLDER_TRITON}"], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.fail(f"could not install triton {OLDER_TRITON} into {cache} (network?):\n{out.stderr[-2000:]}")
    return cache


@pytest.fixture(scope="module", params=["installed", OLDER_TRITON])
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's current default, stated (3.10 flips it)
    if request.param != "installed":
        env["PYTHONPATH"] = os.pathsep.join([str(triton_36_site()), str(ROOT)])
    out = subprocess.run([sys.executable, "-c", "import triton; print('triton', triton.__version__)"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    version = out.stdout.split()[-1]
    assert request.param == "installed" or version == OLDER_TRITON, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "tests._helpers.aot_compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"triton {version}:")
    for r in rows:
        print(f"  {r['kernel']:<50} {r['target']}: " + (r.get("error") or
              f"{r['registers']} registers, {r['spills']} spill bytes, {r['shared']} B shared"))
    return rows


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    # per key type (fp32, bf16, fp64): 3 selection kernels, 3 SGD, 1 re-masking, 2 N:M; 2 AdamW for fp32
    # and fp64 each; the digit selection; masked_linear in fp32 (exact and tf32), fp16 and bf16:
    # forward and dX in each autotuning candidate (3 for exact fp32, 4 otherwise), dW in 2; x 2 targets
    linear = 2 * 3 + 2 + 3 * (2 * 4 + 2)
    assert len(compiled) == 2 * (3 * (3 + 3 + 1 + 2) + 2 * 2 + 1 + linear)
    errors = [f"{r['kernel']} {r['target']}: {r['error']}" for r in compiled if "error" in r]
    assert errors == []


def test_no_kernel_spills_or_overflows_shared_memory(compiled):
    bad = [f"{r['kernel']} {r['target']}: {r['spills']} spill bytes, {r['shared']} B shared"
           for r in compiled if "error" not in r and (r["spills"] or r["shared"] > r["shared_limit"])]
    assert bad == []


REGISTER_BUDGET = 128  # per thread: two 256-thread blocks of a streaming kernel fit an SM's 64K registers


def test_optimizer_and_mask_kernels_fit_the_register_budget(compiled):
    # the optimizer and re-masking kernels only stream memory: more registers per thread than the
    # budget would cap the blocks per SM, hence the bandwidth (the selection's histogram kernel is
    # not held to it: it needs 175-178 under Triton 3.6, 48 under the installed Triton)
    streaming = {"masked_sgd", "masked_adamw", "apply_masks", "nm_masks"}
    rows = [r for r in compiled if r["kernel"].split()[0] in streaming and "error" not in r]
    assert {r["kernel"].split()[0] for r in rows} == streaming
    over = [f"{r['kernel']} {r['target']}: {r['registers']} registers" for r in rows
            if r["registers"] > REGISTER_BUDGET]
    assert over == []
