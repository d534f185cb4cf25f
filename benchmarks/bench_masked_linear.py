"""masked_linear vs F.linear(x, W*M) and dense F.linear, unstructured and 64x64 block masks."""
import pytest

from dsd_kernels.app.bench import masked_linear_cases

from conftest import DEVICE, run

CASES = masked_linear_cases(DEVICE)
PARAMS = [(c, impl) for c in CASES for impl in ["ours", *c.baselines]]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.op}[{c.name}]-{i}" for c, i in PARAMS])
def test_masked_linear(benchmark, case, impl):
    run(benchmark, case, impl)
