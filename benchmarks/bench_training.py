"""Whole training steps of a sparse phase (ours and the peers) against the dense step, the models
of dsd_kernels.app.bench.training; `dsd-kernels bench --ops training` runs the same cases
and writes each one's time as a multiple of the dense step's."""
import pytest

from dsd_kernels.app.bench.training import case_outline, training_cases

from conftest import DEVICE, run

# the cases are built one at a time (each holds several models and their optimizers' state)
LABELS = case_outline()
PARAMS = [(i, impl) for i, (_, impls) in enumerate(LABELS) for impl in impls]
_current: dict = {}


def _case(index: int):
    """Case `index`, advancing one generator in the parameters' order (a fresh one if asked for
    an earlier case, as with -k)."""
    if _current.get("index") != index:
        if _current.get("index", index) > index or "cases" not in _current:
            _current.update(cases=training_cases(DEVICE), index=-1)
        while _current["index"] < index:
            _current["case"] = None  # the previous case's models go before the next's are built
            _current["case"], _current["index"] = next(_current["cases"]), _current["index"] + 1
    return _current["case"]


@pytest.mark.parametrize("index,impl", PARAMS, ids=[f"{LABELS[i][0]}-{impl}" for i, impl in PARAMS])
def test_training_step(benchmark, index, impl):
    run(benchmark, _case(index), impl)
