"""The train job never writes over a folder that is not its own, never takes a run file of
another configuration for its own, and says which file and key are damaged (issue 38, items 7
and 12)."""
import json
import os
from dataclasses import asdict

import pytest

from dsd_kernels.app import cli
from dsd_kernels.app.config import TrainConfig, load_config
from dsd_kernels.app.train import job_key, run_job


def _files(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


def test_a_non_empty_folder_that_holds_no_job_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "runs").mkdir(parents=True)
    (out / "report.md").write_text("my notes")
    (out / "runs" / "x.json").write_text("{}")
    before = _files(out)
    assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no dsd-kernels train job" in err and len(err.strip().splitlines()) == 1
    assert _files(out) == before


def _job(tmp_path, **settings) -> tuple[str, TrainConfig]:
    cfg = TrainConfig(models=["mlp"], seeds=1, epochs=[1, 1, 1], train_samples=200, **settings)
    cfg.validate()
    out = tmp_path / "job"
    (out / "runs").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg)))
    return str(out), cfg


@pytest.mark.parametrize("content,match", [
    ({"method": "baseline", "model": "mlp", "seed": 0, "test_accuracy": 0.5, "job": "0123456789abcdef"},
     "written by a job with other settings"),
    ({"x": 1}, "is not the result of run baseline-mlp-seed0"),
    ([1, 2], "is not the result of run baseline-mlp-seed0"),
])
def test_a_run_file_of_another_configuration_is_never_taken_as_finished(tmp_path, content, match):
    out, cfg = _job(tmp_path)
    path = os.path.join(out, "runs", "baseline-mlp-seed0.json")
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match=match):
        run_job(cfg, out, resume=True, progress=False)
    assert json.load(open(path)) == content


def test_run_files_carry_the_key_of_their_job(tmp_path):
    out, cfg = _job(tmp_path, protocol="matched")
    report = run_job(cfg, out, resume=True, progress=False)
    results = [json.load(open(os.path.join(out, "runs", f))) for f in os.listdir(os.path.join(out, "runs"))
               if f.endswith(".json")]
    assert len(results) == 3 and all(r["job"] == job_key(cfg) for r in results)
    again = run_job(cfg, out, resume=True, progress=False)  # every run reused
    assert again["summary"] == report["summary"]


@pytest.mark.parametrize("content,match", [('{"seeds": "1"}', r"has seeds='1', expected int"),
                                           ('[1, 2]', "holds a JSON list"),
                                           ('{"epochs": [1, "x", 1]}', "has epochs="),
                                           ('{"seeds": 0}', "config.json: --seeds must be at least 1"),
                                           ('{"colour": 1}', "unknown key")])
def test_a_damaged_config_names_the_file_and_the_key(tmp_path, content, match, capsys):
    out = tmp_path / "job"
    out.mkdir()
    (out / "config.json").write_text(content)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err


@pytest.mark.parametrize("given", [" 2:4", "02:04", "2 : 4"])
def test_resume_compares_the_sparsity_as_the_job_reads_it(tmp_path, given):
    out, cfg = _job(tmp_path, sparsity="2:4")
    assert load_config(out, {"sparsity": given}).sparsity == "2:4"
    with pytest.raises(ValueError, match="other settings"):
        load_config(out, {"sparsity": "1:4"})


def test_batch_size_must_be_positive(tmp_path, capsys):
    assert cli.main(["train", "--batch-size", "0", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
