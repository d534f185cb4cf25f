"""One training run of the train job: a (method, model, seed) with its optimizer, DSD
scheduler or learning-rate schedule, checkpointable at epoch boundaries."""
from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

from ..dsd.scheduler import DSDScheduler
from ..optim import MaskedAdamW, MaskedSGD
from .config import TrainConfig
from .data import Dataset
from .models import build_model, prunable_layers


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


class RunDiverged(RuntimeError):
    """A run's training loss turned non-finite."""


@torch.no_grad()
def evaluate(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100.0


def zero_fractions(model) -> dict[str, float]:
    return {n: float((p == 0).float().mean()) for n, p in prunable_layers(model).items()}


class Run:
    """One (method, model, seed) training run, checkpointable at epoch boundaries. `start`: the
    pre-trained run's state (paper protocol's llr and dsd arms start from it)."""

    def __init__(self, cfg: TrainConfig, data: Dataset, method: str, model_name: str, seed: int,
                 capture_weights: bool = False, start: dict | None = None):
        if method not in cfg.arms:
            raise ValueError(f"method {method!r} is not an arm of the {cfg.protocol} protocol {cfg.arms}")
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
        self.generator = torch.Generator().manual_seed(seed)  # batch order
        self.first_epoch = 0  # epochs trained before this run (paper arms: the pre-training)
        self.pretrained_accuracy = None
        self.capture = capture_weights
        self.snapshots: dict[str, torch.Tensor] = {}
        layers = prunable_layers(self.model)
        self.snapshot_layer = max(layers, key=lambda n: layers[n].numel())
        if start is not None:
            self._start_from(start)
        self.epochs = cfg.run_epochs(method)
        self.dsd = self.lr_schedule = None
        dense, sparse, redense = cfg.epochs
        scale = cfg.redense_lr_scale
        if method == "dsd":
            paper = cfg.protocol == "paper"
            if paper:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr * cfg.sparse_lr_scale
            self.dsd = DSDScheduler(self.optimizer, model=self.model, dense_epochs=dense, sparse_epochs=sparse,
                                    redense_epochs=redense, sparsity=cfg.sparsity, cycles=cfg.cycles,
                                    redense_lr_scale=scale / (cfg.sparse_lr_scale if paper else 1.0))
            if paper:  # the dense phase was the pre-training: prune now
                self._snapshot("dense")
                self.pretrained_zeros = zero_fractions(self.model)
                for _ in range(dense):
                    self.dsd.step()
                self._snapshot("pruned")
        else:
            drop = {"dense": dense + sparse, "llr": dense if cfg.protocol == "matched" else 0,
                    "baseline": math.ceil(2 * dense / 3)}[method]
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = cfg.lr
            self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda epoch: scale if epoch >= drop else 1.0)
        self.epoch = 0  # epochs of this run completed
        self.elapsed_s = 0.0  # training time of this run, over every resumed segment
        self.history: list[dict] = []
        self.phases: list[dict] = []
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)

    def _start_from(self, start: dict) -> None:
        self.model.load_state_dict(start["model"])
        self.optimizer.load_state_dict(start["optimizer"])
        self.generator.set_state(start["generator"])
        self.first_epoch = int(start["epoch"])
        history = json.loads(start["history"])
        self.pretrained_accuracy = history[-1]["test_accuracy"] if history else None

    @property
    def id(self) -> str:
        return f"{self.method}-{self.model_name}-seed{self.seed}"

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "dsd": self.dsd.state_dict() if self.dsd else None,
                "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule else None,
                "generator": self.generator.get_state(), "epoch": self.first_epoch + self.epoch,
                "run_epoch": self.epoch, "elapsed_s": self.elapsed_s,
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
        self.epoch = int(state.get("run_epoch", state["epoch"]))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.history = json.loads(state["history"])
        self.phases = json.loads(state["phases"])
        self.snapshots = state["snapshots"]

    # ------------------------------------------------------------ training
    def _snapshot(self, name: str) -> None:
        if self.capture and name not in self.snapshots:
            self.snapshots[name] = dict(self.model.named_parameters())[self.snapshot_layer].detach().cpu().clone()

    def train_epoch(self) -> float:
        """One epoch; returns the mean training loss. Each rank's loss is its slice's sum over
        the whole batch's size (times the world size, as DDP averages): uneven slices weigh by
        their sizes, so the step is the one-process step up to rounding."""
        self.model.train()
        n, bs = len(self.x_train), self.cfg.batch_size
        order = torch.randperm(n, generator=self.generator).to(self.x_train.device)
        total = torch.zeros((), device=self.x_train.device)
        for start in range(0, n, bs):
            batch = order[start:start + bs]
            idx = batch[self.rank::self.world]  # this rank's slice of the batch
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = F.cross_entropy(self.forward_model(self.x_train[idx]), self.y_train[idx], reduction="sum")
            (loss_sum * (self.world / len(batch))).backward()
            self.optimizer.step()
            total += loss_sum.detach()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return float(total) / n

    def run_epoch(self) -> None:
        started = time.perf_counter()
        phase = self.dsd.phase if self.dsd else "dense"
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss = self.train_epoch()
        epoch = self.first_epoch + self.epoch + 1
        if not math.isfinite(loss):
            raise RunDiverged(f"run {self.id}: the training loss is {loss} at epoch {epoch} (lr {lr:g}; "
                              f"likely cause: the learning rate, --lr, is too high)")
        acc = evaluate(self.model, self.x_test, self.y_test)
        self.history.append({"epoch": epoch, "phase": phase, "lr": lr, "train_loss": loss,
                             "test_accuracy": acc})
        self.epoch += 1
        if self.dsd:
            done = self.dsd.epoch + 1
            last_of_phase = done == self.dsd.total_epochs or self.dsd.phase_at(done) != phase
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
        self.elapsed_s += time.perf_counter() - started

    def result(self) -> dict:
        out = {"method": self.method, "model": self.model_name, "seed": self.seed,
               "data": self.data.name, "test_accuracy": self.history[-1]["test_accuracy"],
               "elapsed_s": self.elapsed_s, "history": self.history}
        if self.pretrained_accuracy is not None:
            out["pretrained_test_accuracy"] = self.pretrained_accuracy
        if self.dsd:
            if self.cfg.protocol == "paper":  # the pre-training is the dense phase
                out["phases"] = [{"name": "dense", "epochs": self.cfg.epochs[0], "lr": self.cfg.lr,
                                  "sparsity": 0.0, "test_accuracy": self.pretrained_accuracy,
                                  "measured_sparsity": self.pretrained_zeros}, *self.phases]
            else:
                out["phases"] = self.phases
        return out


def diverged_result(method: str, model: str, seed: int, data: str, message: str, epoch: int | None) -> dict:
    return {"method": method, "model": model, "seed": seed, "data": data, "test_accuracy": None,
            "diverged": True, "diverged_epoch": epoch, "message": message, "history": []}
