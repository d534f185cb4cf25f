"""The `dsd-kernels train` job: DSD against its two fair baselines, same total epochs.

Methods (one MaskedSGD each, or MaskedAdamW with optimizer="adamw"; same lr, momentum, weight
decay, batch order per seed):
- dense: plain dense training; the learning rate drops to 1/10 at the epoch where DSD
  re-denses, so the only difference to DSD is the pruning.
- llr:   the paper's lower-learning-rate baseline: dense, with the drop right after the
         first dense phase (as long at the low rate as DSD's sparse + re-dense phases).
- dsd:   DSDScheduler: dense -> prune to `sparsity` -> sparse -> re-dense at lr/10.
Runs are written as they finish (runs/<id>.json) and, with checkpoint_every, an
interrupted job resumes from checkpoints/ to the same final numbers (fixed seeds, CPU).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .._files import atomic_torch_save, atomic_write_text
from ..optim import MaskedAdamW, MaskedSGD
from .data import Dataset, load_data
from .models import MODELS, build_model, prunable_layers
from .scheduler import DSDScheduler, PhasePlan

METHODS = ("dense", "llr", "dsd")
# the optimizer of every method: a drop-in for torch's, keeping pruned weights and state at 0
OPTIMIZERS = {
    "sgd": lambda params, cfg: MaskedSGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: MaskedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed job, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class TrainConfig:
    data: str = "mnist1d"
    models: list[str] = field(default_factory=lambda: list(MODELS))
    sparsity: float = 0.5
    epochs: list[int] = field(default_factory=lambda: [20, 20, 20])  # dense, sparse, re-dense
    seeds: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    train_samples: int | None = 1000
    redense_lr_scale: float = 0.1
    cycles: int = 1
    optimizer: str = "sgd"  # sgd (MaskedSGD, with momentum) or adamw (MaskedAdamW, betas as torch's)
    device: str = "cpu"
    checkpoint_every: int = 0

    def validate(self) -> None:
        """Every argument error before any training starts."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if len(self.epochs) != 3 or any(int(e) != e or e < 1 for e in self.epochs):
            raise ValueError(f"--epochs needs three positive integers (dense sparse redense), got {self.epochs}")
        for name in ("seeds", "batch_size", "cycles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"--model must be among {MODELS}, got {self.models}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"--train-samples must be at least 1, got {self.train_samples}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")

    @property
    def plan(self) -> PhasePlan:
        return PhasePlan(*self.epochs, cycles=self.cycles)

    @property
    def total_epochs(self) -> int:
        return self.plan.total_epochs


@torch.no_grad()
def evaluate(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100.0


def zero_fractions(model) -> dict[str, float]:
    return {n: float((p == 0).float().mean()) for n, p in prunable_layers(model).items()}


class Run:
    """One (method, model, seed) training run, checkpointable at epoch boundaries."""

    def __init__(self, cfg: TrainConfig, data: Dataset, method: str, model_name: str, seed: int,
                 capture_weights: bool = False):
        self.cfg, self.data, self.method, self.model_name, self.seed = cfg, data, method, model_name, seed
        device = torch.device(cfg.device)
        torch.manual_seed(seed)
        self.model = build_model(model_name, data.num_features, data.num_classes).to(device)
        self.rank, self.world = world()
        # data parallel (dsd-kernels train --nproc): every rank holds the same model (same seed)
        # and takes its slice of each batch; DDP averages the gradients
        self.forward_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = OPTIMIZERS[cfg.optimizer](self.model.parameters(), cfg)
        dense, sparse, redense = cfg.epochs
        self.dsd = self.lr_schedule = None
        if method == "dsd":
            self.dsd = DSDScheduler(self.optimizer, dense_epochs=dense, sparse_epochs=sparse,
                                    redense_epochs=redense, sparsity=cfg.sparsity,
                                    redense_lr_scale=cfg.redense_lr_scale, cycles=cfg.cycles)
        else:
            drop = dense + sparse if method == "dense" else dense
            scale = cfg.redense_lr_scale
            self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda epoch: scale if epoch >= drop else 1.0)
        self.generator = torch.Generator().manual_seed(seed)  # batch order
        self.epoch = 0
        self.history: list[dict] = []
        self.phases: list[dict] = []
        self.capture = capture_weights
        self.snapshots: dict[str, torch.Tensor] = {}
        layers = prunable_layers(self.model)
        self.snapshot_layer = max(layers, key=lambda n: layers[n].numel())
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)

    @property
    def id(self) -> str:
        return f"{self.method}-{self.model_name}-seed{self.seed}"

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "dsd": self.dsd.state_dict() if self.dsd else None,
                "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule else None,
                "generator": self.generator.get_state(), "epoch": self.epoch,
                "history": json.dumps(self.history), "phases": json.dumps(self.phases),
                "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.dsd:
            self.dsd.load_state_dict(state["dsd"])
        if self.lr_schedule:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.history = json.loads(state["history"])
        self.phases = json.loads(state["phases"])
        self.snapshots = state["snapshots"]

    # ------------------------------------------------------------ training
    def _snapshot(self, name: str) -> None:
        if self.capture and name not in self.snapshots:
            self.snapshots[name] = dict(self.model.named_parameters())[self.snapshot_layer].detach().cpu().clone()

    def train_epoch(self) -> float:
        self.model.train()
        n, bs = len(self.x_train), self.cfg.batch_size
        order = torch.randperm(n, generator=self.generator).to(self.x_train.device)
        total = torch.zeros((), device=self.x_train.device)
        for start in range(0, n, bs):
            idx = order[start:start + bs][self.rank::self.world]  # this rank's slice of the batch
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.forward_model(self.x_train[idx]), self.y_train[idx])
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(idx)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return float(total) / n

    def run_epoch(self) -> None:
        phase = self.dsd.phase if self.dsd else "dense"
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss = self.train_epoch()
        acc = evaluate(self.model, self.x_test, self.y_test)
        self.history.append({"epoch": self.epoch + 1, "phase": phase, "lr": lr, "train_loss": loss,
                             "test_accuracy": acc})
        self.epoch += 1
        if self.dsd:
            last_of_phase = self.epoch == self.cfg.total_epochs or self.dsd.phase_at(self.epoch) != phase
            if last_of_phase:
                self.phases.append({
                    "name": phase, "epochs": self.cfg.plan.length(phase), "lr": lr,
                    "sparsity": self.cfg.sparsity if phase == "sparse" else 0.0,
                    "test_accuracy": acc, "measured_sparsity": zero_fractions(self.model)})
                self._snapshot(phase)
            if self.dsd.step() == "sparse":
                self._snapshot("pruned")
        else:
            self.lr_schedule.step()

    def result(self) -> dict:
        out = {"method": self.method, "model": self.model_name, "seed": self.seed,
               "test_accuracy": self.history[-1]["test_accuracy"], "history": self.history}
        if self.dsd:
            out["phases"] = self.phases
        return out


def plan_runs(cfg: TrainConfig) -> list[tuple[str, str, int]]:
    return [(method, model, seed) for model in cfg.models for seed in range(cfg.seeds)
            for method in METHODS]


def run_job(cfg: TrainConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
            on_epoch_end=None) -> dict:
    """Train every (model, seed, method), write runs/ and the report under out_dir; return the report.

    resume=True continues the job whose config.json is in out_dir (cfg is then ignored but
    for the device). on_epoch_end(run) is called after every epoch (tests use it).
    """
    from tqdm.auto import tqdm

    from .report import build_report, write_report

    config_path = os.path.join(out_dir, "config.json")
    if resume:
        if not os.path.isfile(config_path):
            raise ValueError(f"--resume {out_dir}: no config.json there (not a dsd-kernels train output)")
        with open(config_path) as f:
            saved = json.load(f)
        saved["device"] = cfg.device
        cfg = TrainConfig(**saved)
    cfg.validate()
    data = load_data(cfg.data, cfg.train_samples)  # errors in the data surface before training
    rank, size = world()
    writer = rank == 0  # in a data-parallel job rank 0 writes every file; all ranks read them
    if not resume and os.path.exists(config_path):
        raise ValueError(f"--out {out_dir} already holds a job; use --resume {out_dir} or another --out")
    if size > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    if writer:
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        if not resume:
            atomic_write_text(config_path, json.dumps(asdict(cfg), indent=2))

    runs, snapshots = [], {}
    plan = plan_runs(cfg)
    started = time.perf_counter()
    with tqdm(total=len(plan) * cfg.total_epochs, unit="epoch", disable=not progress or not writer,
              dynamic_ncols=True) as bar:
        for method, model, seed in plan:
            if size > 1:
                torch.distributed.barrier()  # every rank sees the same finished runs and checkpoints
            run = Run(cfg, data, method, model, seed, capture_weights=(method == "dsd" and seed == 0))
            result_path = os.path.join(out_dir, "runs", f"{run.id}.json")
            snap_path = os.path.join(out_dir, "runs", f"{run.id}.snapshots.pt")
            ckpt_path = os.path.join(out_dir, "checkpoints", f"{run.id}.pt")
            if os.path.exists(result_path):
                with open(result_path) as f:
                    runs.append(json.load(f))
                if os.path.exists(snap_path):
                    snapshots[model] = torch.load(snap_path, weights_only=True)
                bar.update(cfg.total_epochs)
                continue
            if os.path.exists(ckpt_path):
                run.load_state_dict(torch.load(ckpt_path, weights_only=True))
                bar.update(run.epoch)
            bar.set_description(run.id)
            while run.epoch < cfg.total_epochs:
                run.run_epoch()
                bar.update(1)
                if writer and cfg.checkpoint_every and run.epoch % cfg.checkpoint_every == 0 \
                        and run.epoch < cfg.total_epochs:
                    atomic_torch_save(run.state_dict(), ckpt_path)
                if on_epoch_end is not None:
                    on_epoch_end(run)
            result = run.result()
            if run.snapshots:
                snapshots[model] = run.snapshots
            if writer:
                if run.snapshots:
                    atomic_torch_save(run.snapshots, snap_path)
                atomic_write_text(result_path, json.dumps(result))
                if os.path.exists(ckpt_path):
                    os.remove(ckpt_path)
            runs.append(result)
    report = build_report(cfg, runs, elapsed_s=time.perf_counter() - started)
    report["config"]["nproc"] = size
    if writer:
        write_report(report, snapshots, out_dir)
    return report
