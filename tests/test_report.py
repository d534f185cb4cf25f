"""The train job's report answers "did DSD help?" (issue 41, item 3): paired differences with
higher / tied / lower counts, a 95% interval (Student's t over the seeds) and a verdict; the
pruned fraction of the pruned layers and of the whole model, labelled; one seed gives no interval;
the paired-difference plot; the environment that made the run."""
import math

import pytest
import torch
from torch import nn

from dsd_kernels.app.config import TrainConfig
from dsd_kernels.app.report import _markdown, build_report, format_table, paired_summary, plot_differences
from dsd_kernels.app.run import pruned_fractions

scipy_stats = pytest.importorskip("scipy.stats")


def test_interval_is_students_t_over_the_seeds():
    diffs = [0.4, 1.1, -0.2, 0.9, 0.6]
    p = paired_summary(diffs)
    mean = sum(diffs) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = scipy_stats.t.ppf(0.975, 4) * std / math.sqrt(5)
    assert p["ci95"] == pytest.approx([mean - half, mean + half])
    assert (p["wins"], p["ties"], p["losses"], p["n"]) == (4, 0, 1, 5)
    assert p["verdict"] == "no difference at 5 seeds"  # the interval holds 0


@pytest.mark.parametrize("diffs,verdict", [([1.0, 1.2, 0.9, 1.1], "better"), ([-1.0, -1.2, -0.9], "worse"),
                                           ([0.0, 0.0, 0.0], "no difference at 3 seeds"),
                                           ([0.5, 0.5], "better")])
def test_verdicts(diffs, verdict):
    assert paired_summary(diffs)["verdict"] == verdict


def test_one_seed_gives_no_interval():
    p = paired_summary([0.7])
    assert p["ci95"] is None and p["verdict"] == "one seed gives no interval"


def _runs(diffs_baseline):
    runs = []
    for seed, d in enumerate(diffs_baseline):
        base = 80.0 + seed
        phases = [{"name": "dense", "test_accuracy": base, "measured_sparsity": {"a": 0.0, "b": 0.0},
                   "pruned_fraction": {"pruned_layers": 0.0, "whole_model": 0.0}},
                  {"name": "sparse", "test_accuracy": base, "measured_sparsity": {"a": 0.0, "b": 0.5},
                   "pruned_fraction": {"pruned_layers": 0.5, "whole_model": 0.375}}]
        runs += [{"method": "baseline", "model": "mlp", "seed": seed, "test_accuracy": base},
                 {"method": "llr", "model": "mlp", "seed": seed, "test_accuracy": base},
                 {"method": "dsd", "model": "mlp", "seed": seed, "test_accuracy": base + d, "phases": phases}]
    return runs


def test_report_rows_count_ties_and_label_the_pruned_fractions(tmp_path):
    cfg = TrainConfig(models=["mlp"], seeds=3, device="cpu")
    report = build_report(cfg, _runs([1.0, 0.0, -0.5]))
    paired = report["summary"]["mlp"]["paired"]["dsd-baseline"]
    assert (paired["wins"], paired["ties"], paired["losses"]) == (1, 1, 1)
    text = _markdown(report)
    assert "| DSD - baseline | +0.17 |" in text and "| 1 / 1 / 1 of 3 | no difference at 3 seeds |" in text
    assert "weights at 0: pruned layers | weights at 0: whole model" in text
    assert "| sparse | " in text and "| 0.500 | 0.375 |" in text
    assert "differences.png" in text
    env = report["environment"]
    assert env["torch"] == torch.__version__ and "cpu_capability" in env and "dsd_kernels" in env
    assert env["cpu_capability"] in text
    plot_differences(report, str(tmp_path / "differences.png"))
    assert (tmp_path / "differences.png").stat().st_size > 0


def test_one_seed_is_said_so():
    cfg = TrainConfig(models=["mlp"], seeds=1, device="cpu")
    report = build_report(cfg, _runs([0.3]))
    table = format_table(report)
    assert "1 seed," in table and "1 seeds" not in table and "+- 0.00" not in table
    assert "no interval (one seed)" in table and "one seed gives no interval" in table
    assert "1 seeds" not in _markdown(report)


def test_pruned_fractions_weigh_layers_by_size():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))  # weights 32 and 16, biases 8 and 2
    with torch.no_grad():
        model[1].weight[:, :4] = 0  # 8 of the pruned layer's 16
    got = pruned_fractions(model, ["1.weight"])
    assert got == {"pruned_layers": 0.5, "whole_model": pytest.approx(8 / 58)}
