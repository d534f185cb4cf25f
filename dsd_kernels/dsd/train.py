"""The `dsd-kernels train` job: DSD against its fair baselines, per model and seed.

protocol="paper" (the default; Han et al., ICLR 2017): per seed, one dense pre-training to
convergence (epochs[0] epochs at `lr`, the last third at lr x redense_lr_scale; trained once,
saved under pretrained/, shared by the arms), then from those same weights, optimizer state and
batch-order generator:
- baseline: the converged model as is;
- llr:      dense, continued at lr x redense_lr_scale for as many epochs as DSD's sparse and
            re-dense phases (the paper's lower-learning-rate baseline);
- dsd:      pruned to `sparsity`, sparse at lr x sparse_lr_scale, re-dense at lr x redense_lr_scale.
protocol="matched": every arm from scratch for the same total epochs:
- dense: dense, the learning rate drops to lr x redense_lr_scale where DSD re-denses;
- llr:   dense, the drop right after the first dense phase;
- dsd:   dense -> sparse -> re-dense (DSDScheduler).
One MaskedSGD (or MaskedAdamW, optimizer="adamw") per run. Runs are written as they finish
(runs/<id>.json); with checkpoint_every an interrupted job resumes from checkpoints/ to the same
final numbers (fixed seeds, CPU). A run whose loss turns non-finite stops there and is reported
as diverged; the other runs go on.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .._files import atomic_torch_save, atomic_write_text
from ..optim import MaskedAdamW, MaskedSGD
from .data import Dataset, load_data
from .models import MODEL_DATA, MODELS, build_model, prunable_layers
from .scheduler import DSDScheduler, PhasePlan

PROTOCOLS = ("paper", "matched")
ARMS = {"paper": ("baseline", "llr", "dsd"), "matched": ("dense", "llr", "dsd")}
DEFAULT_EPOCHS = {"paper": [30, 10, 10], "matched": [20, 20, 20]}
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


@dataclass
class TrainConfig:
    protocol: str = "paper"
    data: str | None = None  # None: each model's own (MODEL_DATA)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    sparsity: float = 0.5
    epochs: list[int] | None = None  # dense (paper: pre-training), sparse, re-dense; None: DEFAULT_EPOCHS
    seeds: int = 5
    lr: float = 0.05
    sparse_lr_scale: float = 1.0  # paper protocol: the sparse phase runs at lr x this
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    train_samples: int | None = 1000  # of MNIST-1D's 4000; other data: all unless given
    redense_lr_scale: float = 0.1
    cycles: int = 1
    optimizer: str = "sgd"  # sgd (MaskedSGD, with momentum) or adamw (MaskedAdamW, betas as torch's)
    device: str = "cpu"
    checkpoint_every: int = 0
    nproc: int = 1

    def __post_init__(self):
        if self.epochs is None and self.protocol in DEFAULT_EPOCHS:
            self.epochs = list(DEFAULT_EPOCHS[self.protocol])

    def validate(self) -> None:
        """Every argument error before anything is written or trained."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.epochs is None or len(self.epochs) != 3 or any(int(e) != e or e < 1 for e in self.epochs):
            raise ValueError(f"--epochs needs three positive integers (dense sparse redense), got {self.epochs}")
        for name in ("seeds", "batch_size", "cycles", "nproc"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        for name in ("lr", "sparse_lr_scale", "redense_lr_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"--model must be among {MODELS}, got {self.models}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"--train-samples must be at least 1 (0 on the command line: all), "
                             f"got {self.train_samples}")
        if self.batch_size < self.nproc:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --nproc {self.nproc}: "
                             f"some rank would get no sample of a batch")
        check_device(self.device)

    @property
    def plan(self) -> PhasePlan:
        return PhasePlan(*self.epochs, cycles=self.cycles)

    @property
    def total_epochs(self) -> int:
        """Epochs of a DSD run from scratch (matched) or from pre-training start to its end (paper)."""
        return self.plan.total_epochs

    @property
    def arms(self) -> tuple[str, ...]:
        return ARMS[self.protocol]

    def data_for(self, model: str) -> str:
        return self.data if self.data is not None else MODEL_DATA[model]

    def run_epochs(self, method: str) -> int:
        """Epochs one run of `method` trains (paper: the arms after pre-training)."""
        if self.protocol == "matched":
            return self.total_epochs
        dense, sparse, redense = self.epochs
        return dense if method == "baseline" else self.cycles * (sparse + redense)


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device (cpu or cuda[:N]): {err}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the train job runs on cpu or cuda only")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices here")


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
            self.dsd = DSDScheduler(self.optimizer, dense_epochs=dense, sparse_epochs=sparse,
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


def plan_runs(cfg: TrainConfig) -> list[tuple[str, str, int]]:
    """(method, model, seed) in training order: per model and seed the arms, the pre-training
    (paper: "baseline") first."""
    return [(method, model, seed) for model in cfg.models for seed in range(cfg.seeds)
            for method in cfg.arms]


# the keys a resumed job may take from the command line (they change no result)
RESUME_MAY_CHANGE = ("device",)


def load_config(out_dir: str, given: dict | None = None) -> TrainConfig:
    """The config of the job in out_dir; `given`: settings named on the command line, which
    must equal the saved ones (but RESUME_MAY_CHANGE, applied)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--resume {out_dir}: no config.json there (not a dsd-kernels train output)")
    try:
        with open(path) as f:
            saved = json.load(f)
        cfg = TrainConfig(**saved)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--resume {out_dir}: {path} is not a train job's config ({err})") from None
    differing = []
    for key, value in (given or {}).items():
        if key in RESUME_MAY_CHANGE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            differing.append(f"--{key.replace('_', '-')} {value!r} (the job has {getattr(cfg, key)!r})")
    if differing:
        raise ValueError(f"--resume {out_dir}: the job was started with other settings: "
                         f"{'; '.join(differing)}. Resume without them, or start a new --out")
    return cfg


def _remove_stale_temporaries(out_dir: str) -> None:
    """Files a kill left half-written (atomic writes go to <name>.tmp<pid> first)."""
    for pattern in ("*.tmp*", os.path.join("*", "*.tmp*")):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            if os.path.isfile(path):
                os.remove(path)


def _load_checkpoint(path: str, what: str):
    """torch.load of a checkpoint; a damaged one is reported by name and None returned."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: truncated, zeroed, not a zip
        warnings.warn(f"{path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                      f"{what}", stacklevel=2)
        return None


def run_job(cfg: TrainConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
            on_epoch_end=None, given: dict | None = None) -> dict:
    """Train every (model, seed, arm), write runs/ and the report under out_dir; return the report.

    resume=True continues the job whose config.json is in out_dir (cfg is then ignored but for
    `given`, the settings named on the command line: see load_config). on_epoch_end(run) is
    called after every epoch (tests use it).
    """
    from tqdm.auto import tqdm

    from .report import build_report, write_report

    config_path = os.path.join(out_dir, "config.json")
    if resume:
        cfg = load_config(out_dir, given)
    rank, size = world()
    if size != cfg.nproc:
        raise ValueError(f"the job is configured for --nproc {cfg.nproc} but runs in {size} processes"
                         + (" (resume it with the --nproc it was started with)" if resume else ""))
    cfg.validate()
    datasets = {}
    for model in cfg.models:  # errors in the data surface before anything is written
        spec = cfg.data_for(model)
        if spec not in datasets:
            # --train-samples applies to --data, or to MNIST-1D when each model takes its own data
            datasets[spec] = load_data(spec, cfg.train_samples if cfg.data is not None or spec == "mnist1d"
                                       else None)
        build_model(model, datasets[spec].num_features, datasets[spec].num_classes)
        n, bs = len(datasets[spec].x_train), cfg.batch_size
        if 0 < n % bs < size:
            raise ValueError(f"{spec}: the last batch of each epoch has {n % bs} samples for {size} "
                             f"processes: some rank would get none (change --batch-size or --train-samples)")
    writer = rank == 0  # in a data-parallel job rank 0 writes every file; all ranks read them
    if not resume and os.path.exists(config_path):
        raise ValueError(f"--out {out_dir} already holds a job; use --resume {out_dir} or another --out")
    if size > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    if writer:
        for sub in ("runs", "checkpoints", "pretrained"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        if resume:
            _remove_stale_temporaries(out_dir)
        else:
            atomic_write_text(config_path, json.dumps(asdict(cfg), indent=2))
    if size > 1:
        torch.distributed.barrier()

    runs, snapshots = [], {}

    def record(result: dict, path: str) -> None:
        """A finished (or diverged) run: into the report and, on the writing rank, runs/."""
        runs.append(result)
        if writer:
            atomic_write_text(path, json.dumps(result, allow_nan=False))

    plan = plan_runs(cfg)
    started = time.perf_counter()
    with tqdm(total=sum(cfg.run_epochs(m) for m, _, _ in plan), unit="epoch",
              disable=not progress or not writer, dynamic_ncols=True) as bar:
        for method, model, seed in plan:
            if size > 1:
                torch.distributed.barrier()  # every rank sees the same finished runs and checkpoints
            data = datasets[cfg.data_for(model)]
            run_id = f"{method}-{model}-seed{seed}"
            result_path = os.path.join(out_dir, "runs", f"{run_id}.json")
            snap_path = os.path.join(out_dir, "runs", f"{run_id}.snapshots.pt")
            ckpt_path = os.path.join(out_dir, "checkpoints", f"{run_id}.pt")
            pretrained_path = os.path.join(out_dir, "pretrained", f"{model}-seed{seed}.pt")
            if os.path.exists(result_path):
                with open(result_path) as f:
                    runs.append(json.load(f))
                if os.path.exists(snap_path):
                    snapshots[model] = torch.load(snap_path, weights_only=True)
                bar.update(cfg.run_epochs(method))
                continue
            start = None
            if cfg.protocol == "paper" and method != "baseline":
                pretraining = next(r for r in runs if r["model"] == model and r["seed"] == seed
                                   and r["method"] == "baseline")
                if pretraining.get("diverged"):
                    record(diverged_result(method, model, seed, data.name, "its pre-training diverged", None),
                           result_path)
                    bar.update(cfg.run_epochs(method))
                    continue
                start = _load_checkpoint(pretrained_path, "the pre-training cannot be shared; delete "
                                         f"runs/baseline-{model}-seed{seed}.json to train it again")
                if start is None:
                    raise ValueError(f"{pretrained_path} is damaged: delete runs/baseline-{model}-seed{seed}.json "
                                     f"and resume to pre-train that seed again")
            run = Run(cfg, data, method, model, seed, capture_weights=(method == "dsd" and seed == 0), start=start)
            if os.path.exists(ckpt_path):
                state = _load_checkpoint(ckpt_path, f"run {run.id} restarts from scratch")
                if state is not None:
                    run.load_state_dict(state)
                    bar.update(run.epoch)
            bar.set_description(run.id)
            try:
                while run.epoch < run.epochs:
                    run.run_epoch()
                    bar.update(1)
                    if writer and cfg.checkpoint_every and run.epoch % cfg.checkpoint_every == 0 \
                            and run.epoch < run.epochs:
                        atomic_torch_save(run.state_dict(), ckpt_path)
                    if on_epoch_end is not None:
                        on_epoch_end(run)
            except RunDiverged as err:
                # the last finite checkpoint (if any) stays in checkpoints/
                warnings.warn(str(err), stacklevel=1)
                record(diverged_result(method, model, seed, data.name, str(err), run.first_epoch + run.epoch + 1),
                       result_path)
                bar.update(run.epochs - run.epoch)
                continue
            if run.snapshots:
                snapshots[model] = run.snapshots
            if writer:
                if run.snapshots:
                    atomic_torch_save(run.snapshots, snap_path)
                if method == "baseline":  # the arms of this seed start from it
                    atomic_torch_save(run.state_dict(), pretrained_path)
            record(run.result(), result_path)
            if writer and os.path.exists(ckpt_path):
                os.remove(ckpt_path)
    report = build_report(cfg, runs, elapsed_s=sum(r.get("elapsed_s", 0.0) for r in runs))
    report["segment_elapsed_s"] = time.perf_counter() - started
    if writer:
        write_report(report, snapshots, out_dir)
    return report
