"""Importing dsd_kernels (ops, optim, nn, dsd, integrations) never imports an optional trainer."""
import subprocess
import sys


def test_no_trainer_is_imported_with_the_package():
    code = ("import sys, dsd_kernels as dk; dk.optim, dk.nn, dk.dsd, dk.integrations; "
            "import dsd_kernels.integrations._dsd_run; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
