"""`dsd-kernels study` (dsd_kernels/app/study.py), tiny: every cell paired over seeds with its
interval and verdict, the units shared and resumed, another study's folder refused."""
import json
import os

import pytest

from dsd_kernels.app.cli import main
from dsd_kernels.app.study import LADDERS, SPARSITIES, run_study


def test_a_quick_study_pairs_every_cell_and_resumes(tmp_path):
    out = str(tmp_path / "study")
    study = run_study(out, seeds=2, workers=1, quick=True, progress=False, models=("mlp",))
    cells = study["cells"]
    assert len(cells) == 2 * len(LADDERS) * len(SPARSITIES)  # two sizes
    for c in cells:
        for key in ("dsd_minus_baseline", "dsd_minus_llr"):
            p = c[key]
            assert p["n"] == 2 and p["ci95"] is not None and p["wins"] + p["ties"] + p["losses"] == 2
    # the differences are the units' own accuracies, seed by seed
    units = {(u["size"], u["seed"]): u for u in study["units"]}
    c = cells[0]
    key = f"{c['ladder']}@{c['sparsity']}"
    want = [units[(c["size"], s)]["dsd"][key] - units[(c["size"], s)]["baseline"] for s in (0, 1)]
    assert c["dsd_minus_baseline"]["mean"] == pytest.approx(sum(want) / 2)
    for name in ("study.json", "study.md", "differences.png", "settings.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "DSD - baseline" in open(os.path.join(out, "study.md")).read()
    # a second call trains nothing: every unit is read back
    mtimes = {f: os.path.getmtime(os.path.join(out, "units", f)) for f in os.listdir(os.path.join(out, "units"))}
    again = run_study(out, seeds=2, workers=1, quick=True, progress=False, models=("mlp",))
    assert again["cells"] == cells
    assert mtimes == {f: os.path.getmtime(os.path.join(out, "units", f)) for f in mtimes}
    # another study's settings in that folder: refused by the CLI with the file named, nothing written
    assert main(["study", "--out", out, "--seeds", "3", "--quick", "--workers", "1", "--models", "mlp",
                 "--no-progress"]) == 2
    assert json.load(open(os.path.join(out, "settings.json")))["seeds"] == 2


@pytest.mark.parametrize("argv,message", [(["--seeds", "1"], "at least 2"), (["--models", "resnet"], "among"),
                                          (["--workers", "0"], "at least 1")])
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    assert main(["study", "--out", str(tmp_path / "s"), "--quick", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
