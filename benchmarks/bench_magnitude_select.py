"""magnitude_thresholds / magnitude_masks vs torch.kthvalue, torch.topk and a per-layer loop."""
import pytest

from dsd_kernels.app.bench import magnitude_select_cases

from conftest import DEVICE, run

CASES = magnitude_select_cases(DEVICE)
PARAMS = [(c, impl) for c in CASES for impl in ["ours", *c.baselines]]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.op}[{c.name}]-{i}" for c, i in PARAMS])
def test_magnitude_select(benchmark, case, impl):
    run(benchmark, case, impl)
