"""One training run of the train job: a (method, model, seed) with its optimizer, DSD
scheduler or learning-rate schedule, checkpointable at epoch boundaries."""
from __future__ import annotations

import json
import math
import re
import time

import torch
import torch.nn.functional as F

from .._dtensor import full_tensor
from ..dsd.rigl import RigLScheduler
from ..dsd.scheduler import DSDScheduler
from ..optim import MaskedAdamW, MaskedSGD
from .config import SPARSE_DROP_FRACTION, SPARSE_END_FRACTION, TrainConfig
from .data import Dataset
from .models import build_model, prunable_layers


# the optimizer of every method: a drop-in for torch's, keeping pruned weights and state at 0
OPTIMIZERS = {
    "sgd": lambda params, cfg: MaskedSGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: MaskedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


# the pre-training's step decay: its last third at lr/10
PRETRAIN_LR_DROP = 0.1


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


def first_conv_weight(model) -> str | None:
    """Qualified name of the first convolution's weight (None: the model has no convolution)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return f"{name}.weight" if name else "weight"
    return None


def dsd_exclude(cfg: TrainConfig, model) -> list[str] | None:
    """The weights DSD leaves dense beyond the default scope: the first convolution with
    first_conv="dense" (the paper does not prune it)."""
    name = first_conv_weight(model) if cfg.first_conv == "dense" else None
    return None if name is None else [f"^{re.escape(name)}$"]


def check_dsd_scope(cfg: TrainConfig, model_name: str, model) -> None:
    """The DSD arm's weights can take --sparsity: an N:M pattern needs rows (shape[0], -1) of a
    multiple of M (checked before anything is written)."""
    from ..ops._common import nm_pattern
    from ..ops.nm_masks import check_nm_rows
    from ..scope import select
    pattern = nm_pattern(cfg.sparsity) if isinstance(cfg.sparsity, str) else None
    if pattern is None:
        return
    selected = select(model, cfg.sparsity, exclude=dsd_exclude(cfg, model))
    try:
        check_nm_rows([s.param for s in selected], *pattern, names=[f"{model_name}'s {s.name}" for s in selected])
    except ValueError as err:
        hint = " (--first-conv dense leaves the first convolution dense)" if cfg.first_conv == "pruned" else ""
        raise ValueError(f"--sparsity {cfg.sparsity}: {err}{hint}") from None


def zero_fractions(model) -> dict[str, float]:
    return {n: float((full_tensor(p) == 0).float().mean()) for n, p in prunable_layers(model).items()}


def pruned_fractions(model, pruned: list[str]) -> dict[str, float]:
    """The fraction of weights exactly 0 in the layers DSD prunes (`pruned`: their names) and over
    every parameter of the model (dense layers, biases and norms included)."""
    layers = prunable_layers(model)
    def zero_share(tensors):
        total = sum(t.numel() for t in tensors)
        return sum(int((full_tensor(t) == 0).sum()) for t in tensors) / total if total else 0.0
    return {"pruned_layers": zero_share([layers[n] for n in pruned]),
            "whole_model": zero_share(list(model.parameters()))}


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
        # --fsdp: FSDP2 shards every parameter across the ranks; its state dicts are gathered
        # whole (full_state_dict), so a checkpoint resumes on any number of processes
        self.sharded = cfg.fsdp and self.world > 1
        if self.sharded:
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard
            from torch.distributed.device_mesh import init_device_mesh
            fully_shard(self.model, mesh=init_device_mesh(device.type, (self.world,)))
        elif self.world > 1:
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
        self.dsd = self.lr_schedule = self.rigl = None
        self.sparse_masks = False  # the sparse protocol's pruned arms (static, set, rigl)
        dense = cfg.epochs[0]
        plan = cfg.plan
        if cfg.protocol == "sparse":
            self._start_sparse_arm(data)
        elif method == "dsd":
            for group in self.optimizer.param_groups:  # the pre-training ended at a lower rate
                group["lr"] = cfg.lr
            self.dsd = DSDScheduler(self.optimizer, model=self.model, dense_epochs=dense, sparse_epochs=plan.sparse,
                                    redense_epochs=plan.redense, sparsity=cfg.sparsity, cycles=cfg.cycles,
                                    sparse_lr_scale=cfg.sparse_lr_scale,
                                    redense_lr_scale=cfg.redense_lr_scale,
                                    exclude=dsd_exclude(cfg, self.model), **cfg.ramp,
                                    block=None if cfg.block is None else tuple(cfg.block))
            chosen = {id(s.param) for s in self.dsd.selected}
            self.pruned_layers = [n for n, p in prunable_layers(self.model).items() if id(p) in chosen]
            if cfg.protocol == "paper":  # the dense phase was the pre-training: prune now
                self._snapshot("dense")
                self.pretrained_zeros = zero_fractions(self.model)
                self.pretrained_pruned = pruned_fractions(self.model, self.pruned_layers)
                for _ in range(dense):
                    self.dsd.step()
                self._snapshot("pruned")
        else:
            # paper llr and matched dense: DSD's learning rates without its pruning; matched llr:
            # the re-dense rate from the end of the first dense phase; baseline: the pre-training
            if method == "baseline":
                drop = math.ceil(2 * dense / 3)
                schedule = lambda epoch: PRETRAIN_LR_DROP if epoch >= drop else 1.0  # noqa: E731
            elif method == "llr" and cfg.protocol == "matched":
                schedule = lambda epoch: cfg.redense_lr_factor if epoch >= dense else 1.0  # noqa: E731
            else:
                offset = dense if cfg.protocol == "paper" else 0  # paper llr starts after pre-training
                schedule = lambda epoch: plan.lr_scale(epoch + offset, cfg.sparse_lr_scale,  # noqa: E731
                                                       cfg.redense_lr_factor)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = cfg.lr
            self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.epoch = 0  # epochs of this run completed
        self.elapsed_s = 0.0  # training time of this run, over every resumed segment
        self.history: list[dict] = []
        self.phases: list[dict] = []
        self.x_train, self.y_train = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)

    def _start_sparse_arm(self, data: Dataset) -> None:
        """The sparse protocol: every arm at lr with the pre-training's step drop (the last third
        at lr/10); static: magnitude-pruned at init, its mask fixed; set / rigl: RigLScheduler,
        a mask update after every epoch's last step until 3/4 of the steps."""
        cfg, method = self.cfg, self.method
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = cfg.lr
        drop = math.ceil(2 * self.epochs / 3)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: PRETRAIN_LR_DROP if epoch >= drop else 1.0)
        if method == "dense":
            return
        from ..scope import masks_for, select
        exclude = dsd_exclude(cfg, self.model)
        block = None if cfg.block is None else tuple(cfg.block)
        self.sparse_masks = True
        if method == "static":
            selected = select(self.model, cfg.sparsity, exclude=exclude)
            self.optimizer.set_masks(masks_for(selected, block=block))
            chosen = {id(s.param) for s in selected}
        else:
            steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
            total_steps = steps_per_epoch * self.epochs
            self.rigl = RigLScheduler(self.optimizer, model=self.model, sparsity=cfg.sparsity, exclude=exclude,
                                      growth="gradient" if method == "rigl" else "random",
                                      update_every=steps_per_epoch,
                                      end_step=max(1, math.floor(SPARSE_END_FRACTION * total_steps)),
                                      drop_fraction=SPARSE_DROP_FRACTION, seed=self.seed, block=block)
            chosen = {id(s.param) for s in self.rigl.selected}
        self.pruned_layers = [n for n, p in prunable_layers(self.model).items() if id(p) in chosen]

    def _model_and_optimizer_state(self) -> tuple[dict, dict]:
        if not self.cfg.fsdp:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        # every rank gathers (a collective); the whole state, on the CPU, in each rank's copy
        return get_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))

    def _load_model_and_optimizer(self, model_state: dict, optimizer_state: dict) -> None:
        if not self.cfg.fsdp:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        # group keys this optimizer lacks (the pre-training's initial_lr, from its LR schedule)
        # break torch's mapping of a full optimizer state: the arms set their own rates anyway
        live = set(self.optimizer.param_groups[0])
        optimizer_state = {**optimizer_state, "param_groups": [{k: v for k, v in g.items() if k in live}
                                                               for g in optimizer_state["param_groups"]]}
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))

    def _start_from(self, start: dict) -> None:
        self._load_model_and_optimizer(start["model"], start["optimizer"])
        self.generator.set_state(start["generator"])
        self.first_epoch = int(start["epoch"])
        history = json.loads(start["history"])
        self.pretrained_accuracy = history[-1]["test_accuracy"] if history else None

    @property
    def id(self) -> str:
        return f"{self.method}-{self.model_name}-seed{self.seed}"

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        model_state, optimizer_state = self._model_and_optimizer_state()
        return {"model": {k: v.cpu() for k, v in model_state.items()}, "optimizer": optimizer_state,
                "dsd": self.dsd.state_dict() if self.dsd else None,
                "rigl": self.rigl.state_dict() if self.rigl else None,
                "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule else None,
                "generator": self.generator.get_state(), "epoch": self.first_epoch + self.epoch,
                "run_epoch": self.epoch, "elapsed_s": self.elapsed_s,
                "history": json.dumps(self.history), "phases": json.dumps(self.phases),
                "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self._load_model_and_optimizer(state["model"], state["optimizer"])
        if self.dsd:
            self.dsd.load_state_dict(state["dsd"])
        if self.rigl:
            self.rigl.load_state_dict(state["rigl"])
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
            weight = full_tensor(dict(self.model.named_parameters())[self.snapshot_layer])  # every rank
            self.snapshots[name] = weight.detach().cpu().clone()

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
            if self.rigl is not None:
                self.rigl.step()
            total += loss_sum.detach()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return float(total) / n

    def _masked_fraction(self) -> float:
        """The sparse protocol's arms: the pruned fraction of the masked weights (0.0 dense)."""
        if not self.sparse_masks:
            return 0.0
        masks = self.optimizer.masks
        total = sum(m.numel for m in masks.values())
        return sum(m.numel - m.count() for m in masks.values()) / total if total else 0.0

    def step_lr(self) -> float:
        """The learning rate the first param group's steps run at now (DSD's phase scale applied)."""
        return float(self.optimizer.param_groups[0]["lr"]) * (self.dsd.lr_scale if self.dsd else 1.0)

    def run_epoch(self) -> None:
        started = time.perf_counter()
        phase = self.dsd.phase if self.dsd else ("sparse" if self.sparse_masks else "dense")
        lr = self.step_lr()
        sparsity = self.dsd.pruned_fraction() if self.dsd else self._masked_fraction()  # sharded: a collective
        loss = self.train_epoch()
        epoch = self.first_epoch + self.epoch + 1
        if not math.isfinite(loss):
            raise RunDiverged(f"run {self.id}: the training loss is {loss} at epoch {epoch} (lr {lr:g}; "
                              f"likely cause: the learning rate, --lr, is too high)")
        acc = evaluate(self.model, self.x_test, self.y_test)
        self.history.append({"epoch": epoch, "phase": phase, "lr": lr, "sparsity": sparsity,
                             "train_loss": loss, "test_accuracy": acc})
        self.epoch += 1
        if self.dsd:
            done = self.dsd.epoch + 1
            last_of_phase = done == self.dsd.total_epochs or self.dsd.phase_at(done) != phase
            if last_of_phase:
                self.phases.append({
                    "name": phase, "epochs": self.cfg.plan.length(phase), "lr": lr,
                    "sparsity": self.cfg.sparsity if phase == "sparse" else 0.0,
                    "test_accuracy": acc, "measured_sparsity": zero_fractions(self.model),
                    "pruned_fraction": pruned_fractions(self.model, self.pruned_layers)})
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
        if self.sparse_masks:
            out["pruned_fraction"] = pruned_fractions(self.model, self.pruned_layers)
            if self.rigl is not None:
                out["mask_updates"] = self.rigl.updates
        if self.dsd:
            if self.cfg.protocol == "paper":  # the pre-training is the dense phase
                out["phases"] = [{"name": "dense", "epochs": self.cfg.epochs[0], "lr": self.cfg.lr,
                                  "sparsity": 0.0, "test_accuracy": self.pretrained_accuracy,
                                  "measured_sparsity": self.pretrained_zeros,
                                  "pruned_fraction": self.pretrained_pruned}, *self.phases]
            else:
                out["phases"] = self.phases
        return out


def diverged_result(method: str, model: str, seed: int, data: str, message: str, epoch: int | None) -> dict:
    return {"method": method, "model": model, "seed": seed, "data": data, "test_accuracy": None,
            "diverged": True, "diverged_epoch": epoch, "message": message, "history": []}
