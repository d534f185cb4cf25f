"""DSDScheduler phases, masks and learning rates; the train job end to end; resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dsd_kernels.app import cli
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.app.data import load_data
from dsd_kernels.app.train import Run, TrainConfig, run_job
from dsd_kernels.optim import MaskedSGD
from tests._helpers.step_rates import StepRates


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.ReLU(), torch.nn.Linear(33, 4))


def train_steps(model, opt, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_phases_boundaries_and_dsdsd():
    opt = MaskedSGD(small_model().parameters(), lr=0.1, momentum=0.9)
    s = DSDScheduler(opt, dense_epochs=2, sparse_epochs=3, redense_epochs=1, sparsity=0.5, cycles=2)
    assert s.total_epochs == 10
    assert [s.phase_at(e) for e in range(10)] == (["dense"] * 2 + ["sparse"] * 3 + ["redense"]
                                                  + ["sparse"] * 3 + ["redense"])
    assert s.phase_plan() == [("dense", 0, 2), ("sparse", 2, 3), ("redense", 5, 1),
                              ("sparse", 6, 3), ("redense", 9, 1)]
    rates = StepRates(opt)
    entered = []
    for _ in range(10):
        opt.step()
        entered.append(s.step())
    assert entered == [None, "sparse", None, None, "redense", "sparse", None, None, "redense", None]
    assert opt.masks == {}  # the last phase is re-dense
    assert rates.seen == pytest.approx([0.1] * 5 + [0.01] * 5)  # scaled once, not per cycle
    assert opt.param_groups[0]["lr"] == 0.1  # the group keeps its own rate: the scale applies per step
    with pytest.raises(RuntimeError, match="after the last"):
        s.step()


def test_sparse_phase_keeps_exact_per_layer_sparsity_after_many_steps():
    model = small_model()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    s = DSDScheduler(opt, dense_epochs=1, sparse_epochs=3, redense_epochs=1, sparsity=0.7)
    train_steps(model, opt, 5)
    assert s.step() == "sparse" and s.phase == "sparse"
    for epoch in range(3):
        train_steps(model, opt, 20, seed=epoch)
        for layer in (model[0].weight, model[2].weight):
            assert int((layer == 0).sum()) == round(0.7 * layer.numel())
            assert torch.equal(layer == 0, ~opt.masks[layer].to_bool())
        assert not (model[0].bias == 0).any()  # 1-D params are never pruned
        if epoch < 2:
            s.step()


def test_redense_lr_is_one_tenth_and_pruned_weights_restart_at_zero_then_move():
    model = small_model()
    opt = MaskedSGD(model.parameters(), lr=0.2, momentum=0.9)
    s = DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=2, sparsity=0.5)
    train_steps(model, opt)
    s.step()
    pruned = ~opt.masks[model[0].weight].to_bool()
    train_steps(model, opt)
    assert s.step() == "redense"
    assert s.lr_scale == pytest.approx(0.1)
    rates = StepRates(opt)
    w = model[0].weight
    assert w[pruned].eq(0).all()
    assert opt.state[w]["momentum_buffer"][pruned].eq(0).all()
    train_steps(model, opt, 3)
    assert rates.seen == pytest.approx([0.02] * 3)
    assert (w[pruned] != 0).float().mean() > 0.9  # the pruned weights train again


LR_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=40),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
              torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[3]),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def _step_rates(make_scheduler, *, dsd: bool, epochs: int = 12, steps_per_epoch: int = 3, **dsd_args):
    """The rate of every optimizer step of a run with one torch LR scheduler stepped per step,
    with or without a DSD schedule of 4 dense, 4 sparse and 4 re-dense epochs."""
    model = small_model()
    opt = MaskedSGD(model.parameters(), lr=1.0, momentum=0.9)
    scheduler = make_scheduler(opt)
    rates = None
    if dsd:
        s = DSDScheduler(opt, dense_epochs=4, sparse_epochs=4, redense_epochs=4, sparsity=0.5, **dsd_args)
    rates = StepRates(opt)
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            opt.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)  # a flat loss: the rate halves every step
            else:
                scheduler.step()
        if dsd and epoch < epochs - 1:
            s.step()
    return rates.seen


@pytest.mark.parametrize("name", list(LR_SCHEDULERS))
@pytest.mark.parametrize("sparse_lr_scale", [1.0, 0.1])
def test_the_phase_scales_compose_with_every_torch_lr_scheduler(name, sparse_lr_scale):
    """Whatever the LR scheduler sets, a step runs at that rate times the phase's scale (1 dense,
    sparse_lr_scale sparse, sparse_lr_scale * 0.1 re-dense), without handing the scheduler over."""
    plain = _step_rates(LR_SCHEDULERS[name], dsd=False)
    with_dsd = _step_rates(LR_SCHEDULERS[name], dsd=True, sparse_lr_scale=sparse_lr_scale)
    scales = [1.0] * 12 + [sparse_lr_scale] * 12 + [sparse_lr_scale * 0.1] * 12
    assert with_dsd == pytest.approx([rate * scale for rate, scale in zip(plain, scales)], rel=1e-12)
    assert len(set(plain)) > 1  # the scheduler did move the rate


def test_lr_scheduler_argument_is_no_longer_needed():
    with pytest.warns(FutureWarning, match="no longer needed"):
        passed = _step_rates(LR_SCHEDULERS["LambdaLR"], dsd=True, lr_scheduler="ignored")
    assert passed == _step_rates(LR_SCHEDULERS["LambdaLR"], dsd=True)


def test_a_step_that_raises_leaves_the_rate_unscaled():
    model = small_model()
    opt = MaskedSGD(model.parameters(), lr=1.0)
    s = DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5, sparse_lr_scale=0.1)
    s.step()
    opt.register_step_pre_hook(lambda o, a, k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 1.0  # put back before the exception left the step
    s.close()
    assert opt.param_groups[0]["lr"] == 1.0


def test_scheduler_state_dict_round_trip():
    opt = MaskedSGD(small_model().parameters(), lr=0.1)
    s = DSDScheduler(opt, dense_epochs=2, sparse_epochs=2, redense_epochs=2, sparsity=0.5)
    s.step(), s.step(), s.step()
    saved = s.state_dict()
    s.close()  # one scheduler per optimizer at a time
    s2 = DSDScheduler(opt, dense_epochs=2, sparse_epochs=2, redense_epochs=2, sparsity=0.5)
    s2.load_state_dict(saved)
    assert s2.epoch == 3 and s2.phase == "sparse"
    s2.close()
    s3 = DSDScheduler(opt, dense_epochs=3, sparse_epochs=2, redense_epochs=2, sparsity=0.5)
    with pytest.raises(ValueError, match="dense_epochs"):
        s3.load_state_dict(saved)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(sparsity=1.0), ValueError, "sparsity"), (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity=float("nan")), ValueError, "sparsity"),
    (dict(dense_epochs=0), ValueError, "dense_epochs"), (dict(sparse_epochs=-1), ValueError, "sparse_epochs"),
    (dict(cycles=0), ValueError, "cycles"),
])
def test_scheduler_bad_input(kwargs, err, match):
    opt = MaskedSGD(small_model().parameters(), lr=0.1)
    args = {**dict(dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=0.5), **kwargs}
    with pytest.raises(err, match=match):
        DSDScheduler(opt, **args)


def test_optimizer_without_masks_is_rejected():
    with pytest.raises(TypeError, match="cannot hold masks"):
        DSDScheduler(torch.optim.SGD(small_model().parameters(), lr=0.1), dense_epochs=1,
                     sparse_epochs=1, redense_epochs=1, sparsity=0.5)


# ---------------------------------------------------------------- the train job
TINY = dict(protocol="matched", models=["mlp"], seeds=1, epochs=[2, 3, 2], train_samples=200, checkpoint_every=1)


def untimed(results):
    """Run results without their training time (the one figure that differs between runs)."""
    if isinstance(results, list):
        return [untimed(r) for r in results]
    return {k: v for k, v in results.items() if k != "elapsed_s"}


def test_run_resumed_mid_sparse_phase_is_bit_identical():
    cfg = TrainConfig(**TINY)
    data = load_data("mnist1d", cfg.train_samples)
    full = Run(cfg, data, "dsd", "mlp", 0)
    while full.epoch < cfg.total_epochs:
        full.run_epoch()
    first = Run(cfg, data, "dsd", "mlp", 0)
    for _ in range(3):  # dense, dense, first sparse epoch
        first.run_epoch()
    assert first.dsd.phase == "sparse"
    state = first.state_dict()
    resumed = Run(cfg, data, "dsd", "mlp", 0)
    resumed.load_state_dict(state)
    while resumed.epoch < cfg.total_epochs:
        resumed.run_epoch()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert untimed(full.result()) == untimed(resumed.result())


class Interrupt(Exception):
    pass


def test_job_interrupted_and_resumed_matches_uninterrupted(tmp_path):
    whole = run_job(TrainConfig(**TINY), str(tmp_path / "whole"), progress=False)

    def interrupt(run):
        if run.method == "dsd" and run.epoch == 4:  # inside the sparse phase
            raise Interrupt

    out = str(tmp_path / "killed")
    with pytest.raises(Interrupt):
        run_job(TrainConfig(**TINY), out, progress=False, on_epoch_end=interrupt)
    assert os.path.exists(os.path.join(out, "checkpoints", "dsd-mlp-seed0.pt"))
    assert not os.path.exists(os.path.join(out, "report.json"))
    resumed = run_job(TrainConfig(), out, resume=True, progress=False)
    assert untimed(resumed["runs"]) == untimed(whole["runs"])
    assert resumed["summary"] == whole["summary"]


def test_cli_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "quick")
    assert cli.main(["train", "--quick", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "DSD - baseline" in printed and "DSD - llr" in printed and "cnn2d on digits" in printed
    assert printed.lstrip().startswith("QUICK RUN (--quick)")  # a smoke run is marked as such
    with open(os.path.join(out, "report.md")) as f:
        assert f.readline().strip() == "# DSD vs its baselines (quick run)"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quick"] is True
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert set(report) >= {"config", "runs", "summary"} and report["config"]["protocol"] == "paper"
    assert len(report["runs"]) == 3 * 3 * 2  # models x arms x seeds
    for run in report["runs"]:
        assert {"method", "model", "seed", "test_accuracy", "data"} <= set(run)
        assert run["data"] == ("digits" if run["model"] == "cnn2d" else "mnist1d")
        baseline = next(r for r in report["runs"] if r["method"] == "baseline" and r["model"] == run["model"]
                        and r["seed"] == run["seed"])
        if run["method"] != "baseline":  # the arms start from the pre-trained model
            assert run["pretrained_test_accuracy"] == baseline["test_accuracy"]
            assert run["history"][0]["epoch"] == 4 and len(run["history"]) == 6
        if run["method"] == "dsd":
            assert [p["name"] for p in run["phases"]] == ["dense", "sparse", "redense"]
            sparse = run["phases"][1]
            assert sparse["sparsity"] == 0.5
            measured = sparse["measured_sparsity"]
            first_conv = {"mlp": None, "cnn": "1.weight", "cnn2d": "1.weight"}[run["model"]]
            assert all(abs(v - 0.5) < 1e-2 for name, v in measured.items() if name != first_conv)
            if first_conv is not None:  # the paper protocol leaves the first convolution dense
                assert measured[first_conv] == 0.0
            assert {"epochs", "lr", "test_accuracy"} <= set(sparse)
            # the paper's ladder: sparse at lr/10, re-dense at lr/100
            assert sparse["lr"] == pytest.approx(0.005) and run["phases"][2]["lr"] == pytest.approx(0.0005)
        if run["method"] == "llr":  # DSD's rates, no pruning
            assert [h["lr"] for h in run["history"]] == pytest.approx([0.005] * 3 + [0.0005] * 3)
    assert set(report["summary"]["mlp"]["paired"]) == {"dsd-baseline", "dsd-llr"}
    for name in ("accuracy.png", "weights.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(out, "report.md"))


def test_cli_killed_and_resumed(tmp_path, capsys):
    """A real SIGKILL of a running `dsd-kernels train`, then --resume, equals an uninterrupted run."""
    args = ["--quick", "--model", "mlp", "--seeds", "1", "--train-samples", "2000", "--epochs", "2", "3", "3",
            "--checkpoint-every", "1", "--no-progress"]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "dsd_kernels.app.cli", "train", *args, "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpts = os.path.join(killed, "checkpoints")
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(n.endswith(".pt") for n in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "report.json")), "the job finished before the kill"
    assert cli.main(["train", "--resume", killed, "--no-progress"]) == 0
    whole = str(tmp_path / "whole")
    assert cli.main(["train", *args, "--out", whole]) == 0
    reports = []
    for d in (killed, whole):
        with open(os.path.join(d, "report.json")) as f:
            reports.append(json.load(f))
    assert untimed(reports[0]["runs"]) == untimed(reports[1]["runs"])


def test_digits_and_npz_data(tmp_path):
    digits = load_data("digits")
    assert digits.num_features == 64 and digits.num_classes == 10
    path = str(tmp_path / "own.npz")
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.normal(size=(50, 6)), y_train=rng.integers(0, 3, 50),
             x_test=rng.normal(size=(20, 6)), y_test=rng.integers(0, 3, 20))
    report = run_job(TrainConfig(data=path, models=["mlp", "cnn"], seeds=1, epochs=[1, 1, 1],
                                 train_samples=None), str(tmp_path / "out"), progress=False)
    assert len(report["runs"]) == 6


@pytest.mark.parametrize("arrays,match", [
    (dict(x_train=np.zeros((5, 3)), y_train=np.zeros(5, int), x_test=np.zeros((2, 3))), "missing arrays"),
    (dict(x_train=np.zeros((5, 3)), y_train=np.zeros(4, int), x_test=np.zeros((2, 3)),
          y_test=np.zeros(2, int)), "one label per row"),
    (dict(x_train=np.zeros((5, 3)), y_train=np.array([0, 1, 0, 1, 0]), x_test=np.zeros((2, 3)),
          y_test=np.array([0, 5])), "out of range"),
    (dict(x_train=np.zeros((5, 3)), y_train=np.array([0, 1, 0, -1, 0]), x_test=np.zeros((2, 3)),
          y_test=np.array([0, 1])), "negative label"),
    (dict(x_train=np.zeros((5, 3)), y_train=np.array([0, 1, 0, 1, 0]), x_test=np.zeros((2, 4)),
          y_test=np.array([0, 1])), "features"),
])
def test_bad_data_fails_before_training(tmp_path, arrays, match, capsys):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_data(path)
    assert cli.main(["train", "--data", path, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "runs")


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.0"], "--sparsity"), (["--sparsity", "-0.5"], "--sparsity"),
    (["--epochs", "0", "1", "1"], "--epochs"), (["--seeds", "0"], "--seeds"),
    (["--data", "nowhere.npz"], "neither"), (["--train-samples", "99999"], "--train-samples"),
    (["--nproc", "0"], "--nproc"),
])
def test_bad_cli_arguments(tmp_path, argv, match, capsys):
    assert cli.main(["train", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("sparsity", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5],
                         ids=["np.float32", "np.float64", "0-d tensor", "float"])
def test_scheduler_takes_any_real_sparsity(sparsity):
    opt = MaskedSGD(small_model().parameters(), lr=0.1)
    s = DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=sparsity)
    assert s.sparsity == 0.5 and type(s.sparsity) is float
    s.step()
    assert all(abs(m.sparsity - 0.5) < 0.02 for m in opt.masks.values())
    with pytest.raises(ValueError, match="sparsity '0.5' is not an N:M pattern"):
        DSDScheduler(opt, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity="0.5")


def test_phase_plan_is_one_definition():
    from dsd_kernels.dsd.plan import PhasePlan
    plan = PhasePlan(2, 3, 1, cycles=2)
    assert plan.total_epochs == 2 + 2 * (3 + 1)
    assert [plan.phase_at(e) for e in range(plan.total_epochs)] == \
        ["dense"] * 2 + (["sparse"] * 3 + ["redense"]) * 2
    assert plan.phases() == [("dense", 0, 2), ("sparse", 2, 3), ("redense", 5, 1),
                             ("sparse", 6, 3), ("redense", 9, 1)]
    cfg = TrainConfig(epochs=[2, 3, 1], cycles=2)
    assert cfg.plan == plan and cfg.total_epochs == plan.total_epochs


def test_cli_defaults_are_the_train_config_defaults():
    args = cli.build_parser().parse_args(["train"])
    d = TrainConfig()
    assert (args.data, args.cycles, args.seeds, args.lr, args.batch_size,
            args.checkpoint_every) == (d.data, d.cycles, d.seeds, d.lr, d.batch_size, d.checkpoint_every)
    # --sparsity unset: the protocol's default (0.5 for DSD's protocols, 0.9 for the sparse one)
    assert args.sparsity is None and TrainConfig(protocol=args.protocol, sparsity=args.sparsity).sparsity == d.sparsity
    sparse = cli.build_parser().parse_args(["train", "--protocol", "sparse"])
    assert TrainConfig(protocol=sparse.protocol, sparsity=sparse.sparsity).sparsity == 0.9


def test_train_job_with_adamw(tmp_path):
    out = tmp_path / "adamw"
    assert cli.main(["train", "--quick", "--model", "mlp", "--seeds", "1", "--optimizer", "adamw",
                     "--lr", "0.001", "--epochs", "1", "1", "1", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["optimizer"] == "adamw"
    phases = next(r for r in report["runs"] if r["method"] == "dsd")["phases"]
    assert phases[1]["name"] == "sparse" and all(abs(v - 0.5) < 1e-2 for v in phases[1]["measured_sparsity"].values())
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        TrainConfig(optimizer="lion").validate()
