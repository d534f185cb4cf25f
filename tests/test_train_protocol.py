"""The train job's protocols (paper: arms from one shared pre-training; matched: from scratch)
and its behaviour on bad input and faults: every case here failed before its fix."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from dsd_kernels.app import cli
from dsd_kernels.app import report as report_module
from dsd_kernels.app.data import load_data
from dsd_kernels.app.train import Run, TrainConfig, run_job

PAPER = dict(protocol="paper", models=["mlp"], seeds=1, epochs=[3, 2, 2], train_samples=200, checkpoint_every=1)


def strict_json(path):
    def no_constant(name):
        raise ValueError(f"{path} holds {name}: not strict JSON")
    with open(path) as f:
        return json.load(f, parse_constant=no_constant)


# ---------------------------------------------------------------- paper protocol
def test_paper_arms_start_from_the_shared_pretraining():
    cfg = TrainConfig(**{**PAPER, "sparse_lr_scale": 0.5})
    data = load_data("mnist1d", cfg.train_samples)
    baseline = Run(cfg, data, "baseline", "mlp", 0)
    while baseline.epoch < baseline.epochs:
        baseline.run_epoch()
    assert [h["lr"] for h in baseline.history] == pytest.approx([0.05, 0.05, 0.005])  # the last third at lr/10
    start = baseline.state_dict()
    llr = Run(cfg, data, "llr", "mlp", 0, start=start)
    dsd = Run(cfg, data, "dsd", "mlp", 0, start=start)
    for arm in (llr, dsd):
        assert arm.first_epoch == 3 and arm.epochs == 4
        assert arm.pretrained_accuracy == baseline.history[-1]["test_accuracy"]
        assert torch.equal(arm.generator.get_state(), baseline.generator.get_state())
    for a, b in zip(baseline.model.parameters(), llr.model.parameters()):
        assert torch.equal(a, b)
    for name, p in dsd.model.named_parameters():  # pruned from the pre-trained weights right away
        if p.dim() >= 2:
            assert int((p == 0).sum()) == round(0.5 * p.numel())
            kept = p != 0
            assert torch.equal(p[kept], dict(baseline.model.named_parameters())[name][kept])
    for arm in (llr, dsd):
        while arm.epoch < arm.epochs:
            arm.run_epoch()
    # llr runs DSD's learning rates without its pruning: lr x 0.5 sparse, then that x 0.1 (the
    # paper protocol's default redense_lr_scale, relative to the sparse rate) re-dense
    assert [h["lr"] for h in llr.history] == pytest.approx([0.025, 0.025, 0.0025, 0.0025])
    assert [h["lr"] for h in dsd.history] == [h["lr"] for h in llr.history]  # the same floats
    assert [h["sparsity"] for h in dsd.history] == pytest.approx([0.5, 0.5, 0.0, 0.0], abs=2e-3)
    assert [h["sparsity"] for h in llr.history] == [0.0] * 4
    assert [h["epoch"] for h in dsd.history] == [4, 5, 6, 7]
    assert [p["name"] for p in dsd.result()["phases"]] == ["dense", "sparse", "redense"]


def test_paper_job_report_and_pretrained_checkpoint(tmp_path):
    report = run_job(TrainConfig(**PAPER), str(tmp_path), progress=False)
    assert os.path.exists(tmp_path / "pretrained" / "mlp-seed0.pt")
    saved = strict_json(tmp_path / "report.json")
    assert saved["config"]["protocol"] == "paper"
    assert [r["method"] for r in saved["runs"]] == ["baseline", "llr", "dsd"]
    entry = report["summary"]["mlp"]
    assert set(entry["paired"]) == {"dsd-baseline", "dsd-llr"}
    assert [p["name"] for p in entry["dsd_phases"]] == ["dense", "sparse", "redense"]
    assert report["elapsed_s"] == pytest.approx(sum(r["elapsed_s"] for r in report["runs"]))


@pytest.mark.parametrize("protocol", ["paper", "matched"])
def test_dsdsd_in_both_protocols(tmp_path, protocol):
    cfg = TrainConfig(**{**PAPER, "protocol": protocol, "cycles": 2, "epochs": [2, 1, 1], "checkpoint_every": 0})
    report = run_job(cfg, str(tmp_path), progress=False)
    dsd = next(r for r in report["runs"] if r["method"] == "dsd")
    assert [p["name"] for p in dsd["phases"]] == ["dense", "sparse", "redense", "sparse", "redense"]
    llr = next(r for r in report["runs"] if r["method"] == "llr")
    assert len(llr["history"]) == (4 if protocol == "paper" else 6)
    assert set(report["summary"]["mlp"]["paired"]) == {f"dsd-{cfg.arms[0]}", "dsd-llr"}


# ---------------------------------------------------------------- divergence
def test_a_diverging_run_stops_and_is_reported_while_the_others_go_on(tmp_path):
    def blow_up(run):
        if run.method == "llr" and run.epoch == 2:
            for group in run.optimizer.param_groups:
                group["lr"] = 1e12

    with pytest.warns(UserWarning, match=r"run llr-mlp-seed0: the training loss is (nan|inf) at epoch 6 .*--lr"):
        report = run_job(TrainConfig(**PAPER), str(tmp_path), progress=False, on_epoch_end=blow_up)
    saved = strict_json(tmp_path / "report.json")  # strict JSON: no NaN tokens
    llr = next(r for r in saved["runs"] if r["method"] == "llr")
    assert llr["diverged"] and llr["test_accuracy"] is None and llr["diverged_epoch"] == 6
    assert "learning rate" in llr["message"]
    assert os.path.exists(tmp_path / "checkpoints" / "llr-mlp-seed0.pt")  # the last finite checkpoint stays
    assert report["summary"]["mlp"]["diverged"]["llr"] == [0]
    assert "llr" not in report["summary"]["mlp"]["methods"] and "dsd" in report["summary"]["mlp"]["methods"]
    assert os.path.exists(tmp_path / "accuracy.png")


def test_lr_1e6_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "o")
    with pytest.warns(UserWarning, match="baseline-mlp-seed0: the training loss"):
        assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--lr", "1e6",
                         "--out", out, "--no-progress"]) == 0
    saved = strict_json(os.path.join(out, "report.json"))
    assert all(r["diverged"] for r in saved["runs"])
    assert "diverged on seeds [0]" in capsys.readouterr().out


# ---------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def interrupted_job(out):
    def interrupt(run):
        if run.method == "llr" and run.epoch == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        run_job(TrainConfig(**PAPER), out, progress=False, on_epoch_end=interrupt)


@pytest.mark.parametrize("argv,named", [
    (["--sparsity", "0.9"], "--sparsity 0.9"), (["--model", "cnn"], "--models ['cnn']"),
    (["--epochs", "3", "2", "1"], "--epochs [3, 2, 1]"), (["--protocol=matched"], "--protocol 'matched'"),
])
def test_resume_with_other_settings_is_refused(tmp_path, argv, named, capsys):
    out = str(tmp_path / "job")
    interrupted_job(out)
    assert cli.main(["train", "--resume", out, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert named in err and "the job was started with other settings" in err
    assert cli.main(["train", "--resume", out, "--sparsity", "0.5", "--device", "cpu", "--no-progress"]) == 0


def test_resume_in_another_number_of_processes_is_refused(tmp_path):
    out = str(tmp_path / "job")
    interrupted_job(out)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    config["nproc"] = 2
    open(os.path.join(out, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match="--nproc 2 but runs in 1 process"):
        run_job(TrainConfig(), out, resume=True, progress=False)


def test_stale_temporaries_truncated_checkpoint_and_elapsed_time(tmp_path):
    out = str(tmp_path / "job")
    interrupted_job(out)
    checkpoint = os.path.join(out, "checkpoints", "llr-mlp-seed0.pt")
    stale = checkpoint + ".tmp12345"
    open(stale, "wb").write(b"half a checkpoint")
    data = open(checkpoint, "rb").read()
    open(checkpoint, "wb").write(data[: len(data) // 2])  # truncated
    previous = os.path.join(out, "checkpoints", "llr-mlp-seed0.previous.pt")
    os.remove(previous)  # no good checkpoint left
    with pytest.warns(UserWarning, match=r"llr-mlp-seed0\.pt is damaged.* run llr-mlp-seed0 restarts from scratch"):
        report = run_job(TrainConfig(), out, resume=True, progress=False)
    assert not glob.glob(os.path.join(out, "**", "*.tmp*"), recursive=True)
    whole = run_job(TrainConfig(**PAPER), str(tmp_path / "whole"), progress=False)
    assert report["runs"][1]["history"] == whole["runs"][1]["history"]  # restarted from scratch: same run
    baseline_time = report["runs"][0]["elapsed_s"]  # trained in the first segment only
    assert baseline_time > 0 and report["elapsed_s"] == pytest.approx(sum(r["elapsed_s"] for r in report["runs"]))


def _damage_tensor_bytes(path):
    """Flip bytes inside the largest tensor record of a torch.save zip; the zip stays readable."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(open(path, "rb").read())
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    for k in range(start + info.file_size // 2, start + info.file_size // 2 + 8):
        data[k] ^= 0x5A
    open(path, "wb").write(bytes(data))
    torch.load(path, weights_only=True)  # still loads: only the digest can tell


@pytest.mark.parametrize("damaged", ["newest", "both"])
def test_damaged_checkpoint_is_caught_and_the_previous_good_one_taken(tmp_path, damaged):
    """Tensor bytes damaged with the zip intact: the sha256 written beside each checkpoint catches
    it on resume; the run restarts from the previous good checkpoint (or from scratch where both
    are damaged) and ends exactly as an uninterrupted run."""
    out = str(tmp_path / "job")
    interrupted_job(out)
    checkpoint = os.path.join(out, "checkpoints", "llr-mlp-seed0.pt")
    previous = os.path.join(out, "checkpoints", "llr-mlp-seed0.previous.pt")
    assert open(checkpoint + ".sha256").read().split()[1] == "llr-mlp-seed0.pt"
    _damage_tensor_bytes(checkpoint)
    if damaged == "both":
        _damage_tensor_bytes(previous)
    match = (r"llr-mlp-seed0\.previous\.pt is damaged: its sha256 .* restarts from scratch" if damaged == "both"
             else r"llr-mlp-seed0\.pt is damaged: its sha256 .* trying the previous checkpoint")
    with pytest.warns(UserWarning, match=match):
        report = run_job(TrainConfig(), out, resume=True, progress=False)
    whole = run_job(TrainConfig(**PAPER), str(tmp_path / "whole"), progress=False)
    for resumed, straight in zip(report["runs"], whole["runs"]):
        assert resumed["history"] == straight["history"]
    assert not os.listdir(os.path.join(out, "checkpoints"))  # finished runs leave no checkpoint


def test_report_json_is_written_last(tmp_path, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(report_module, "plot_weights", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_job(TrainConfig(**{**PAPER, "checkpoint_every": 0}), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "report.json")  # its presence means the job finished
    assert os.path.exists(tmp_path / "runs" / "dsd-mlp-seed0.json")


# ---------------------------------------------------------------- bad input
def npz(path, **override):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 4)), y_train=np.arange(40) % 3,
                  x_test=rng.normal(size=(10, 4)), y_test=np.arange(10) % 3)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def write_bad(tmp_path, kind):
    path = str(tmp_path / "bad.npz")
    if kind == "npy":
        path = str(tmp_path / "bad.npy")
        np.save(path, np.zeros((3, 3)))
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        npz(path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "label 2^31":
        npz(path, y_train=np.where(np.arange(40) == 5, 2**31, np.arange(40) % 3).astype(np.int64))
    elif kind == "label 2^64-1":
        npz(path, y_train=np.where(np.arange(40) == 5, 2**64 - 1, np.arange(40) % 3).astype(np.uint64))
    elif kind == "huge x":
        npz(path, x_train=np.full((40, 4), 1e308) * np.where(np.arange(40) % 2, 1, -1)[:, None])
    elif kind == "no features":
        npz(path, x_train=np.zeros((40, 0)), x_test=np.zeros((10, 0)))
    elif kind == "complex x":
        npz(path, x_train=np.zeros((40, 4), complex), x_test=np.zeros((10, 4), complex))
    elif kind == "one class":
        npz(path, y_train=np.ones(40, int), y_test=np.ones(10, int))
    elif kind == "label 50000":
        npz(path, y_train=np.where(np.arange(40) == 5, 50000, np.arange(40) % 3))
    return path


@pytest.mark.parametrize("kind,match", [
    ("npy", "a single array"), ("empty", "not a readable .npz"), ("truncated", "not a readable .npz|cannot be read"),
    ("label 2^31", "labels must be 0..K-1"), ("label 2^64-1", "labels must be 0..K-1"),
    ("huge x", "too large to standardise"), ("no features", "no features"), ("complex x", "real numbers"),
    ("one class", "at least 2 classes"), ("label 50000", "labels must be 0..K-1"),
])
def test_bad_data_files_fail_clearly_before_anything_is_written(tmp_path, kind, match, capsys):
    path = write_bad(tmp_path, kind)
    with pytest.raises(ValueError, match=match) as error:
        load_data(path)
    assert os.path.basename(path) in str(error.value)
    out = tmp_path / "o"
    assert cli.main(["train", "--data", path, "--model", "mlp", "--out", str(out), "--no-progress"]) == 2
    assert os.path.basename(path) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["--device", "foo"], "--device 'foo' is not a device"), (["--device", "mps"], "cpu or cuda only"),
    (["--device", "meta"], "cpu or cuda only"), (["--train-samples", "-5"], "--train-samples must be >= 0"),
    (["--nproc", "3", "--batch-size", "2"], "smaller than --nproc"), (["--lr", "nan"], "--lr must be"),
    (["--protocol", "paper", "--sparse-lr-scale", "0"], "--sparse-lr-scale"),
    (["--redense-lr-scale", "inf"], "--redense-lr-scale must be"),
    (["--sparsity", "3:2"], "not an N:M pattern"), (["--sparsity", "1.5"], "--sparsity"),
    (["--protocol", "matched", "--sparsity", "2:4", "--model", "cnn"],
     "cnn's 1.weight of shape (32, 1, 5) has rows of 5 weights"),
    (["--protocol", "matched", "--sparsity", "2:4", "--model", "cnn"], "--first-conv dense"),
    (["--ramp-epochs", "3", "--ramp-every", "2"], "--ramp-epochs=3 must be a multiple of --ramp-every=2"),
    (["--ramp-epochs", "20"], "longer than the sparse phase"),
    (["--ramp-epochs", "4", "--sparsity", "2:4"], "needs a fractional sparsity"),
    (["--ramp-every", "2"], "--ramp-every 2 needs --ramp-epochs"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, argv, match, capsys):
    out = tmp_path / "o"
    assert cli.main(["train", *argv, "--out", str(out), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_train_samples_holding_too_few_classes_is_refused(tmp_path, capsys):
    """--train-samples takes the first rows: with labels sorted, they may be one class."""
    path = str(tmp_path / "sorted.npz")
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.normal(size=(60, 4)), y_train=np.repeat(np.arange(3), 20),  # sorted
             x_test=rng.normal(size=(12, 4)), y_test=np.arange(12) % 3)
    assert cli.main(["train", "--data", path, "--train-samples", "20", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--train-samples 20" in err and "only the classes {0} (1 of 3)" in err
    assert not os.path.exists(tmp_path / "o")  # refused before anything is written
    # 40 rows (at least 10 per class) must hold all three; classes 0 and 1 only is refused too
    assert cli.main(["train", "--data", path, "--train-samples", "40", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert "only the classes {0, 1} (2 of 3)" in capsys.readouterr().err


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    for flag in ("--out", "--resume"):
        assert cli.main(["train", flag, str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} {target} is a file, not a folder" in err
    assert target.read_text() == "keep me"


def test_sigint_prints_where_the_checkpoints_are_and_exits_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "job"
    # a job far longer than the wait: the signal always finds it running (a loaded CI machine once
    # let a 50-epoch job finish before the poll saw its first checkpoint)
    proc = subprocess.Popen([sys.executable, "-m", "dsd_kernels.app.cli", "train", "--model", "mlp", "--seeds", "1",
                             "--epochs", "2000", "50", "50", "--checkpoint-every", "1", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell without job control starts background jobs with SIGINT ignored,
                            # and the child would inherit that: give it the default a terminal gives
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            glob.glob(str(out / "checkpoints" / "*.pt")) or glob.glob(str(out / "pretrained" / "*.pt"))):
        time.sleep(0.05)
    assert proc.poll() is None, f"the job ended before the signal: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert f"continue with: dsd-kernels train --resume {out}" in stderr
    assert f"checkpoints every 1 epochs in {out / 'checkpoints'}" in stderr


# ---------------------------------------------------------------- the paper's ladder, N:M, gradual pruning
def test_protocol_defaults():
    paper, matched = TrainConfig(protocol="paper"), TrainConfig(protocol="matched")
    # one meaning everywhere: each scale relative to the phase before, as DSDScheduler's
    assert (paper.sparse_lr_scale, paper.redense_lr_scale, paper.first_conv) == (0.1, 0.1, "dense")
    assert (matched.sparse_lr_scale, matched.redense_lr_scale, matched.first_conv) == (1.0, 0.1, "pruned")
    assert paper.phase_lrs() == {"dense": 0.05, "sparse": 0.05 * 0.1, "redense": 0.05 * (0.1 * 0.1)}
    assert TrainConfig(protocol="paper", sparse_lr_scale=0.5).sparse_lr_scale == 0.5


def _legacy_job(tmp_path, **settings):
    """A config.json as versions before the relative scales wrote it: --redense-lr-scale
    relative to --lr, no "lr_scales" key."""
    from dataclasses import asdict
    cfg = TrainConfig(**{**PAPER, **settings})
    saved = asdict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return saved


def test_a_job_from_before_the_relative_scales_resumes_at_its_own_rates(tmp_path, capsys):
    import hashlib
    from dsd_kernels.app.config import load_config
    from dsd_kernels.app.train import job_key
    saved = _legacy_job(tmp_path, redense_lr_scale=0.01)  # the old paper ladder: lr/10, lr/100
    cfg = load_config(str(tmp_path))
    err = capsys.readouterr().err
    assert "relative to --lr" in err and "re-dense at lr x 0.01, as the job ran" in err
    assert cfg.redense_lr_scale == pytest.approx(0.1) and cfg.redense_lr_factor == 0.01
    # its run files keep their key (the digest the old version wrote), so they are reused
    old_key = hashlib.sha256(json.dumps({k: v for k, v in saved.items()
                                         if k not in ("device", "nproc", "checkpoint_every")},
                                        sort_keys=True).encode()).hexdigest()[:16]
    assert job_key(cfg) == old_key
    data = load_data("mnist1d", cfg.train_samples)
    start = Run(cfg, data, "baseline", "mlp", 0).state_dict()
    llr, dsd = (Run(cfg, data, arm, "mlp", 0, start=start) for arm in ("llr", "dsd"))
    for arm in (llr, dsd):
        while arm.epoch < arm.epochs:
            arm.run_epoch()
    assert [h["lr"] for h in llr.history] == pytest.approx([0.005, 0.005, 0.0005, 0.0005])
    assert [h["lr"] for h in dsd.history] == pytest.approx([h["lr"] for h in llr.history], rel=1e-15)
    # the old number on the command line is refused, saying what it is now
    with pytest.raises(ValueError, match=r"--redense-lr-scale 0.01 .*before --redense-lr-scale became relative "
                                         r"to the sparse rate.*is --redense-lr-scale 0.1 now"):
        load_config(str(tmp_path), {"redense_lr_scale": 0.01})


def test_a_new_job_writes_which_scales_it_means(tmp_path):
    from dsd_kernels.app.config import LR_SCALES, load_config
    from dsd_kernels.app.train import job_key
    out = tmp_path / "job"
    assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--epochs", "1", "1", "1",
                     "--train-samples", "64", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr_scales"] == LR_SCALES and saved["redense_lr_scale"] == 0.1
    cfg = load_config(str(out))
    assert cfg.redense_lr_factor == cfg.sparse_lr_scale * cfg.redense_lr_scale
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["learning_rates"] == cfg.phase_lrs()
    assert f"lr {cfg.lr:g} dense, {cfg.lr * 0.1:g} sparse, {cfg.lr * 0.1 * 0.1:g} re-dense" \
        in (out / "report.md").read_text()
    runs = glob.glob(str(out / "runs" / "*.json"))
    assert runs and all(json.loads(open(p).read())["job"] == job_key(cfg) for p in runs)


def test_two_four_sparsity_and_a_ramp_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "nm"
    assert cli.main(["train", "--quick", "--model", "cnn", "--seeds", "1", "--sparsity", "2:4",
                     "--out", str(out), "--no-progress"]) == 0
    report = strict_json(out / "report.json")
    assert report["config"]["sparsity"] == "2:4"
    dsd = next(r for r in report["runs"] if r["method"] == "dsd")
    measured = dsd["phases"][1]["measured_sparsity"]
    assert measured.pop("1.weight") == 0.0 and all(v == 0.5 for v in measured.values())
    assert "sparsity 2:4" in capsys.readouterr().out
    out = tmp_path / "ramp"
    assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--epochs", "2", "4", "1",
                     "--ramp-epochs", "4", "--ramp-every", "2", "--out", str(out), "--no-progress"]) == 0
    dsd = next(r for r in strict_json(out / "report.json")["runs"] if r["method"] == "dsd")
    shares = [1 - (1 - k / 2) ** 3 for k in (1, 2)]
    want = [0.5 * shares[0]] * 2 + [0.5] * 2 + [0.0]
    assert [h["sparsity"] for h in dsd["history"]] == pytest.approx(want, abs=1e-3)
    assert "reached gradually over 4 epochs (every 2)" in (out / "report.md").read_text()


# ---------------------------------------------------------------- the sparse protocol (RigL, SET)
SPARSE = dict(protocol="sparse", models=["mlp"], seeds=1, epochs=[1, 1, 1], train_samples=128, checkpoint_every=1)


def test_sparse_protocol_arms_from_scratch_at_one_sparsity(tmp_path):
    cfg = TrainConfig(**SPARSE)
    assert cfg.sparsity == 0.9 and cfg.arms == ("dense", "static", "set", "rigl") and cfg.focal_arm == "rigl"
    data = load_data("mnist1d", cfg.train_samples)
    runs = {arm: Run(cfg, data, arm, "mlp", 0) for arm in cfg.arms}
    for arm, run in runs.items():
        while run.epoch < run.epochs:
            run.run_epoch()
        assert [h["lr"] for h in run.history] == pytest.approx([0.05, 0.05, 0.005])  # one schedule for all
    static, set_, rigl = (runs[a].optimizer.masks for a in ("static", "set", "rigl"))
    for masks in (static, set_, rigl):
        assert all(m.numel - m.count() == round(0.9 * m.numel) for m in masks.values())  # exact, every layer
    assert runs["rigl"].rigl.updates == 2 and runs["set"].rigl.updates == 2  # after epochs 1 and 2 (< 3/4 of 3)
    # the three start from one magnitude mask (same seed, same init); SET and RigL moved theirs, differently
    assert any(not torch.equal(a.to_bool(), b.to_bool()) for a, b in zip(static.values(), rigl.values()))
    assert any(not torch.equal(a.to_bool(), b.to_bool()) for a, b in zip(set_.values(), rigl.values()))
    result = runs["rigl"].result()
    assert result["mask_updates"] == 2 and result["pruned_fraction"]["pruned_layers"] >= 0.9
    assert "pruned_fraction" not in runs["dense"].result()


@pytest.mark.parametrize("arm", ["set", "rigl"])
def test_sparse_protocol_resumes_bit_identical(arm):
    cfg = TrainConfig(**SPARSE)
    data = load_data("mnist1d", cfg.train_samples)
    straight = Run(cfg, data, arm, "mlp", 0)
    while straight.epoch < straight.epochs:
        straight.run_epoch()
    first = Run(cfg, data, arm, "mlp", 0)
    first.run_epoch()
    resumed = Run(cfg, data, arm, "mlp", 0)
    resumed.load_state_dict(first.state_dict())
    while resumed.epoch < resumed.epochs:
        resumed.run_epoch()
    assert resumed.history == straight.history and resumed.rigl.updates == straight.rigl.updates
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_sparse_protocol_job_and_its_report(tmp_path, capsys):
    out = tmp_path / "sparse"
    assert cli.main(["train", "--protocol", "sparse", "--model", "mlp", "--seeds", "2", "--epochs", "1", "1", "1",
                     "--train-samples", "96", "--no-progress", "--out", str(out)]) == 0
    report = strict_json(out / "report.json")
    entry = report["summary"]["mlp"]
    assert set(entry["methods"]) == {"dense", "static", "set", "rigl"}
    assert set(entry["paired"]) == {"rigl-dense", "rigl-static", "rigl-set"}
    assert all(p["n"] == 2 and p["ci95"] is not None for p in entry["paired"].values())
    assert set(entry["pruned_fraction"]) == {"static", "set", "rigl"}
    md = (out / "report.md").read_text()
    assert "# RigL vs dense, a static mask and SET" in md and "| RigL - static |" in md
    assert "weights.png" not in md and (out / "differences.png").exists()
    for bad in (["--sparsity", "2:4"], ["--ramp-epochs", "1"], ["--cycles", "2"]):
        assert cli.main(["train", "--protocol", "sparse", "--out", str(tmp_path / "x"), "--no-progress", *bad]) == 2
        assert "--protocol sparse" in capsys.readouterr().err


def test_mnist1d_cache_holds_the_generated_arrays_and_survives_damage(tmp_path, monkeypatch):
    """Generated MNIST-1D is kept in the cache folder and read back bit for bit; a damaged file
    there is generated anew and replaced; "off" keeps nothing; an unwritable folder only costs
    the time."""
    from mnist1d.data import get_dataset_args, make_dataset

    from dsd_kernels.app import data as data_module

    def fresh():
        data_module._mnist1d_arrays.cache_clear()
        return data_module._mnist1d_arrays()

    made = make_dataset(get_dataset_args())
    want = [made[k] for k in data_module.MNIST1D_KEYS]
    monkeypatch.setenv("DSD_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    try:
        assert fresh() is not None  # generated and written
        [path] = glob.glob(str(tmp_path / "cache" / "mnist1d-*.npz"))
        for a, b in zip(want, fresh()):  # read back
            assert a.dtype == b.dtype and np.array_equal(a, b)
        whole = open(path, "rb").read()
        for damage in (b"", b"not a zip archive", whole[:500]):
            with open(path, "wb") as f:
                f.write(damage)
            assert data_module._read_cached(path) is None
        assert all(np.array_equal(a, b) for a, b in zip(want, fresh()))  # generated anew
        assert all(np.array_equal(a, b) for a, b in zip(want, data_module._read_cached(path)))  # replaced
        assert not glob.glob(str(tmp_path / "cache" / "*.partial"))
        monkeypatch.setenv("DSD_KERNELS_CACHE_DIR", "off")
        assert data_module.cache_dir() is None and data_module._mnist1d_cache_path(get_dataset_args()) is None
        blocker = tmp_path / "a file"
        blocker.write_text("")
        data_module._write_cached(str(blocker / "cache" / "x.npz"), want)  # no error, nothing written
        assert blocker.read_text() == ""
    finally:
        data_module._mnist1d_arrays.cache_clear()
