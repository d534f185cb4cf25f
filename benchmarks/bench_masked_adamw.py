"""MaskedAdamW.step / masked_adamw_ vs torch AdamW (foreach / fused) + mask multiplies, ResNet-50 and GPT-2 small."""
import pytest

from dsd_kernels.app.bench import masked_adamw_cases

from conftest import DEVICE, run

CASES = masked_adamw_cases(DEVICE)
PARAMS = [(c, impl) for c in CASES for impl in ["ours", *c.baselines]]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.op}[{c.name}]-{i}" for c, i in PARAMS])
def test_masked_adamw(benchmark, case, impl):
    run(benchmark, case, impl)
