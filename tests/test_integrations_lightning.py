"""DSDCallback in real Lightning (CPU, fixed seeds): three phases with exact zeros while sparse,
the re-dense LR 1/10 of the configured schedule at every step, gradients masked before
Lightning clips them, metrics in the trainer's logger, and a run stopped in the sparse phase
and resumed from a Lightning checkpoint bit-identical to an uninterrupted one; DDP (gloo, two
processes) as a distributed test."""
import csv
import glob
import os
import subprocess
import sys

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from dsd_kernels.integrations.lightning import DSDCallback  # noqa: E402
from ._helpers.lightning_dsd import BATCH, SAMPLES, TinyNet, loader  # noqa: E402

STEPS_PER_EPOCH = SAMPLES // BATCH
PLAN = dict(dense_epochs=2, sparse_epochs=2, redense_epochs=1)
SPARSE_EPOCHS = (2, 3)


class Zeros(pl.Callback):
    """After every optimizer step (and the DSD callback's work for it): the zero count of each
    Linear weight, and whether the pruned positions are 0."""

    def __init__(self, dsd):
        self.dsd, self.per_step = dsd, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.dsd.scheduler.masks
        self.per_step.append([(int((p == 0).sum()), bool((p[~masks[p].to_bool()] == 0).all()) if p in masks else None)
                              for p in (pl_module.net[0].weight, pl_module.net[3].weight)])


def fit(root, *, dsd=None, ckpt_path=None, model=None, logger=False, checkpoint_every=None, callbacks_after=(),
        **options):
    torch.manual_seed(0)
    model = TinyNet() if model is None else model
    dsd = dsd or DSDCallback(0.5, **PLAN)
    model.dsd = dsd
    zeros = Zeros(dsd)
    callbacks = [dsd, zeros, *callbacks_after]
    if checkpoint_every is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, **checkpoint_every))
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", callbacks=callbacks, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         enable_checkpointing=checkpoint_every is not None,
                         **{"gradient_clip_val": 0.5, **options})
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, trainer, zeros


def expected_lrs(schedule: str, redense_step: int):
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    if schedule == "lambda-step":
        scheduler = torch.optim.lr_scheduler.LambdaLR(probe, lambda s: 1 / (1 + 0.05 * s))
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(probe, step_size=1, gamma=0.8)
    lrs = []
    for step in range(5 * STEPS_PER_EPOCH):
        lrs.append(scheduler.get_last_lr()[0] * (0.1 if step >= redense_step else 1.0))
        if schedule == "lambda-step" or (step + 1) % STEPS_PER_EPOCH == 0:
            scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["lambda-step", "step-per-epoch"])
def test_three_phases_exact_zeros_lr_and_clipping(tmp_path, schedule):
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    model, trainer, zeros = fit(tmp_path, model=TinyNet(schedule=schedule), logger=logger)
    sizes = [model.net[0].weight.numel(), model.net[3].weight.numel()]
    for step, counts in enumerate(zeros.per_step):
        epoch = step // STEPS_PER_EPOCH
        last_of_sparse = step == 4 * STEPS_PER_EPOCH - 1  # re-densed at its end: still 0, no mask
        for (count, at_pruned), numel in zip(counts, sizes):
            if epoch in SPARSE_EPOCHS and not last_of_sparse:
                assert count == numel // 2 and at_pruned, (step, count)
            elif not last_of_sparse and step != 2 * STEPS_PER_EPOCH - 1:
                assert count < numel // 10, (step, count)
    assert model.clipped_grads_masked == [True] * (2 * STEPS_PER_EPOCH)
    want = expected_lrs(schedule, redense_step=4 * STEPS_PER_EPOCH)
    assert len(model.lrs) == len(want)
    for step, (got, expected) in enumerate(zip(model.lrs, want)):
        assert abs(got - expected) <= 1e-12 * expected, (step, got, expected)
    logger.finalize("success")
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("dsd/phase")]
    # each epoch's own values: its phase, its pruned fraction, the rate of its last step
    assert [float(r["dsd/phase"]) for r in rows] == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert [float(r["dsd/sparsity"]) for r in rows] == [0.0, 0.0, 0.5, 0.5, 0.0]
    assert float(rows[3]["dsd/lr"]) == pytest.approx(want[4 * STEPS_PER_EPOCH - 1], rel=1e-6)
    assert float(rows[4]["dsd/lr"]) == pytest.approx(want[5 * STEPS_PER_EPOCH - 1], rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "masked_adamw"])
def test_resume_in_the_sparse_phase_is_bit_identical(tmp_path, optimizer):
    whole, _, whole_zeros = fit(tmp_path / "whole", model=TinyNet(optimizer),
                                checkpoint_every={"every_n_epochs": 1})
    checkpoint = glob.glob(str(tmp_path / "whole" / "epoch=2-*.ckpt"))  # mid sparse phase
    assert len(checkpoint) == 1
    resumed, trainer, zeros = fit(tmp_path / "resumed", model=TinyNet(optimizer), ckpt_path=checkpoint[0])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.lrs == whole.lrs[3 * STEPS_PER_EPOCH:]
    assert zeros.per_step == whole_zeros.per_step[3 * STEPS_PER_EPOCH:]


def test_unit_step_resumes_from_a_mid_epoch_checkpoint(tmp_path):
    """Lightning restarts an epoch's batches on a mid-epoch resume of a plain DataLoader (its
    own limitation, so no bitwise comparison here): the DSD position, masks and LR scale resume
    exactly, and the phases change at the same global steps."""
    def dsd():
        return DSDCallback(0.5, dense_epochs=10, sparse_epochs=14, redense_epochs=16, unit="step")
    whole_dsd = dsd()
    masks_at = {}

    class KeepMasks(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks_at[trainer.global_step] = {p: m.to_bool() for p, m in whole_dsd.scheduler.masks.items()}

    _, _, whole_zeros = fit(tmp_path / "whole", dsd=whole_dsd, checkpoint_every={"every_n_train_steps": 13},
                            callbacks_after=[KeepMasks()])
    assert [c[0][0] == 256 for c in whole_zeros.per_step[8:11]] == [False, True, True]  # pruned after step 10
    assert [c[0][0] == 256 for c in whole_zeros.per_step[22:25]] == [True, True, False]  # re-dense after 24
    checkpoint = glob.glob(str(tmp_path / "whole" / "*step=13.ckpt"))
    assert len(checkpoint) == 1
    resumed_dsd = dsd()
    resumed, trainer, zeros = fit(tmp_path / "resumed", dsd=resumed_dsd, ckpt_path=checkpoint[0])
    assert trainer.global_step == 40 and resumed_dsd.scheduler.epoch == 40
    held = {name: p for name, p in resumed.named_parameters()}
    first = zeros.per_step[:11]  # global steps 14 .. 24
    assert all(c[0] == (256, True) and c[1] == (64, True) for c in first[:-1])
    assert first[-1][0][0] == 256 and first[-1][0][1] is None  # re-densed after step 24
    assert zeros.per_step[11][0][0] < 256
    assert resumed.lrs[11] == pytest.approx(resumed.lrs[10] * 0.1 * (1 + 0.05 * 23) / (1 + 0.05 * 24), rel=1e-12)
    assert {tuple(m.shape) for m in masks_at[13].values()} == {tuple(held["net.0.weight"].shape),
                                                                 tuple(held["net.3.weight"].shape)}


def test_resume_with_another_plan_is_refused(tmp_path):
    fit(tmp_path / "a", checkpoint_every={"every_n_epochs": 1})
    checkpoint = glob.glob(str(tmp_path / "a" / "epoch=2-*.ckpt"))[0]
    with pytest.raises(ValueError, match="sparse_epochs"):
        fit(tmp_path / "b", dsd=DSDCallback(0.5, dense_epochs=2, sparse_epochs=1, redense_epochs=2),
            ckpt_path=checkpoint)


def test_bf16_mixed_precision(tmp_path):
    model, _, zeros = fit(tmp_path, precision="bf16-mixed")
    sparse = zeros.per_step[2 * STEPS_PER_EPOCH:4 * STEPS_PER_EPOCH - 1]
    assert all(c[0] == (model.net[0].weight.numel() // 2, True) for c in sparse)


@pytest.mark.slow
def test_torch_compile(tmp_path):
    torch.manual_seed(0)
    model, _, zeros = fit(tmp_path, model=torch.compile(TinyNet()))
    sparse = zeros.per_step[2 * STEPS_PER_EPOCH:4 * STEPS_PER_EPOCH - 1]
    assert all(c[1] == (64, True) for c in sparse)


def test_two_optimizers_are_refused(tmp_path):
    class TwoOptimizers(TinyNet):
        automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.SGD(self.net[3].parameters(), lr=0.1)]

    with pytest.raises(ValueError, match="one optimizer"):
        fit(tmp_path, model=TwoOptimizers(), gradient_clip_val=None)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes(tmp_path):
    """strategy="ddp" on 2 CPU processes (gloo): the ranks prune the same weights, hold the
    same weights every epoch, and the pruned ones are exactly 0 while sparse."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "tests._helpers.lightning_dsd", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]) == 5
    for (w0, m0), (w1, m1) in zip(*ranks):
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    for epoch in SPARSE_EPOCHS[:1]:  # after epoch 2: masks in force
        weights, masks = ranks[0][epoch]
        assert set(masks) == {"net.0.weight", "net.3.weight"}
        assert int((~masks["net.0.weight"]).sum()) == 256 and bool((weights[0][~masks["net.0.weight"]] == 0).all())


def test_gradual_prune_and_lr_ladder_resume_bit_identical(tmp_path):
    """ramp_epochs=3 in a 1+3+1 plan: the sparse epochs prune to s*(1-(2/3)^3), s*(1-(1/3)^3), s;
    steps run at the schedule's rate x0.1 sparse, x0.01 re-dense; a resume mid-ramp equals the
    uninterrupted run bit for bit."""
    def dsd():
        return DSDCallback(0.6, dense_epochs=1, sparse_epochs=3, redense_epochs=1, redense_lr_scale=0.1,
                           sparse_lr_scale=0.1, ramp_epochs=3)

    whole, _, whole_zeros = fit(tmp_path / "whole", dsd=dsd(), model=TinyNet(), checkpoint_every={"every_n_epochs": 1})
    numel = [whole.net[0].weight.numel(), whole.net[3].weight.numel()]
    for k, epoch in enumerate((1, 2, 3), start=1):
        last_step = whole_zeros.per_step[(epoch + 1) * STEPS_PER_EPOCH - 2]  # inside the epoch
        share = 1 - (1 - k / 3) ** 3
        assert [count for count, _ in last_step] == [round(0.6 * share * n) for n in numel], epoch
        assert all(at_pruned for _, at_pruned in last_step)
    want = expected_lrs("lambda-step", redense_step=10 ** 9)
    scales = [1.0] * STEPS_PER_EPOCH + [0.1] * 3 * STEPS_PER_EPOCH + [0.01] * STEPS_PER_EPOCH
    for step, (got, rate, scale) in enumerate(zip(whole.lrs, want, scales)):
        assert abs(got - rate * scale) <= 1e-12 * rate, (step, got, rate * scale)
    checkpoint = glob.glob(str(tmp_path / "whole" / "epoch=1-*.ckpt"))  # between ramp updates 1 and 2
    assert len(checkpoint) == 1
    resumed, _, zeros = fit(tmp_path / "resumed", dsd=dsd(), model=TinyNet(), ckpt_path=checkpoint[0])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert zeros.per_step == whole_zeros.per_step[2 * STEPS_PER_EPOCH:]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_strategy_two_processes(tmp_path):
    """Lightning's FSDP2 strategy (ModelParallelStrategy, configure_model with fully_shard) on 2
    CPU processes (gloo): the callback prunes the sharded weights to exactly 50% over both ranks'
    shards, and its pruned fraction is the global one on every rank."""
    pytest.importorskip("lightning.pytorch.strategies", reason="ModelParallelStrategy needs Lightning >= 2.4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "tests._helpers.lightning_fsdp", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    total = 16 * 32 + 32 * 4  # the two Linear weights (the LayerNorm stays dense)
    for rank in ranks:  # recorded after the callback acts at each epoch end: pruned at the end of epoch 1, re-densed at the end of epoch 3
        assert rank["pruned"] == [0, total // 2, total // 2, 0, 0]
        assert rank["logged"] == [0.0, 0.5, 0.5, 0.0, 0.0]


# ---------------------------------------------------------------- RigL / SET
def rigl_callback(growth="gradient"):
    # 8 steps an epoch, 5 epochs: updates after steps 4, 8, ..., 28 (end_step 30)
    from dsd_kernels.integrations.lightning import RigLCallback
    return RigLCallback(0.75, update_every=4, end_step=30, growth=growth, drop_fraction=0.5)


@pytest.mark.parametrize("growth", ["gradient", "random"])
@pytest.mark.parametrize("optimizer", ["adamw", "masked_adamw"])
def test_rigl_callback_moves_masks_at_exact_counts_and_resumes_bit_identical(tmp_path, optimizer, growth):
    start = {}

    class FirstMasks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not start:
                start.update({p: m.to_bool() for p, m in pl_module.dsd.scheduler.masks.items()})

    whole, _, _ = fit(tmp_path / "whole", dsd=rigl_callback(growth), model=TinyNet(optimizer),
                      checkpoint_every={"every_n_epochs": 1}, callbacks_after=[FirstMasks()])
    scheduler = whole.dsd.scheduler
    assert scheduler.updates == 7
    masks = scheduler.masks
    assert len(masks) == 2 and any(not torch.equal(start[p], m.to_bool()) for p, m in masks.items())
    for p, m in masks.items():
        assert m.numel - m.count() == round(0.75 * m.numel) and (p[~m.to_bool()] == 0).all()
    assert whole.clipped_grads_masked and all(whole.clipped_grads_masked)  # Lightning clips masked gradients
    checkpoint = glob.glob(str(tmp_path / "whole" / "epoch=1-*.ckpt"))  # after 16 steps, 4 updates
    assert len(checkpoint) == 1
    resumed, _, _ = fit(tmp_path / "resumed", dsd=rigl_callback(growth), model=TinyNet(optimizer),
                        ckpt_path=checkpoint[0])
    assert resumed.dsd.scheduler.updates == 7
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
