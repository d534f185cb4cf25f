"""apply_masks_ (re-masking) vs torch._foreach_mul_ by the masks, GPT-2 small weights."""
import pytest

from dsd_kernels.app.bench import apply_masks_cases

from conftest import DEVICE, run

CASES = apply_masks_cases(DEVICE)
PARAMS = [(c, impl) for c in CASES for impl in ["ours", *c.baselines]]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.op}[{c.name}]-{i}" for c, i in PARAMS])
def test_apply_masks(benchmark, case, impl):
    run(benchmark, case, impl)
