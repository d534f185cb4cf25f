"""Hypothesis fuzzing of every dsd_kernels op and wrapper (tests/_helpers/fuzz_ops.py), in a
subprocess: a crash (segfault, abort) fails this test instead of killing the suite. Each drawn
call must raise a clear error naming an argument, or match the torch backend's bits."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_op_and_wrapper_under_fuzzed_inputs():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests._helpers.fuzz_ops", "--examples", "600", "--seed", "0",
                           "--backends", "cpp,triton"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, (f"fuzzing ended with exit status {proc.returncode} (negative: killed by a "
                                  f"signal)\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["ok"] and counts["calls"] >= 600
    # every outcome was exercised: clear errors, matching results, and meta (fake) calls
    assert counts["raised"] > 50 and counts["same_bits"] > 50 and counts["meta"] > 50, counts
