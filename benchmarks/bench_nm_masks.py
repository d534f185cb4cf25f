"""N:M (2:4) masks of a 4096x4096 fp32 weight vs torch's abs().view(-1, 4).topk(2) + scatter."""
import pytest

from dsd_kernels.app.bench import nm_masks_cases

from conftest import DEVICE, run

CASES = nm_masks_cases(DEVICE)
PARAMS = [(c, impl) for c in CASES for impl in ["ours", *c.baselines]]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.op}[{c.name}]-{i}" for c, i in PARAMS])
def test_nm_masks(benchmark, case, impl):
    run(benchmark, case, impl)
