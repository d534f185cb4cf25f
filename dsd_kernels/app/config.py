"""The train job's settings: `TrainConfig` (every command-line setting, validated before
anything is written or trained) and the config of a job being resumed."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from ..dsd.plan import PhasePlan, check_ramp, checked_block
from ..ops._common import as_sparsity
from .models import MODEL_DATA, MODELS

PROTOCOLS = ("paper", "matched", "sparse")
# sparse: dynamic sparse training from scratch at --sparsity (RigL against dense, a static
# magnitude mask and SET), every arm the same epochs and learning-rate schedule
ARMS = {"paper": ("baseline", "llr", "dsd"), "matched": ("dense", "llr", "dsd"),
        "sparse": ("dense", "static", "set", "rigl")}
# the arm each report compares against the others (paired by seed)
FOCAL_ARM = {"paper": "dsd", "matched": "dsd", "sparse": "rigl"}
DEFAULT_EPOCHS = {"paper": [30, 10, 10], "matched": [20, 20, 20], "sparse": [10, 10, 10]}
DEFAULT_SPARSITY = {"paper": 0.5, "matched": 0.5, "sparse": 0.9}
# RigL's and SET's settings in the sparse protocol: a mask update every epoch until 3/4 of the
# steps, 30% of each layer's kept weights moved at first, decaying by RigL's cosine
SPARSE_DROP_FRACTION = 0.3
SPARSE_END_FRACTION = 0.75
# the paper's learning-rate ladder (sparse at lr/10, re-dense at a further 1/10: lr/100) and its
# dense first convolution; the matched protocol keeps the sparse phase at lr and re-denses at lr/10.
# Each scale is relative to the phase before, as DSDScheduler's arguments are.
PROTOCOL_DEFAULTS = {"paper": {"sparse_lr_scale": 0.1, "redense_lr_scale": 0.1, "first_conv": "dense"},
                     "matched": {"sparse_lr_scale": 1.0, "redense_lr_scale": 0.1, "first_conv": "pruned"},
                     # no phases: the scales are unused; the first convolution stays dense (RigL's setup)
                     "sparse": {"sparse_lr_scale": 1.0, "redense_lr_scale": 1.0, "first_conv": "dense"}}
FIRST_CONV = ("dense", "pruned")
OPTIMIZER_NAMES = ("sgd", "adamw")  # MaskedSGD (with momentum), MaskedAdamW (betas as torch's)


@dataclass
class TrainConfig:
    protocol: str = "paper"
    data: str | None = None  # None: each model's own (MODEL_DATA)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    sparsity: float | str | None = None  # a fraction, or an "N:M" pattern ("2:4"); None: DEFAULT_SPARSITY
    epochs: list[int] | None = None  # dense (paper: pre-training), sparse, re-dense; None: DEFAULT_EPOCHS
    seeds: int = 5
    lr: float = 0.05
    sparse_lr_scale: float | None = None  # the sparse phase runs at lr x this; None: the protocol's
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    train_samples: int | None = 1000  # of MNIST-1D's 4000; other data: all unless given
    redense_lr_scale: float | None = None  # re-dense at the sparse rate x this; None: the protocol's
    first_conv: str | None = None  # "dense" or "pruned"; None: the protocol's
    ramp_epochs: int = 0  # > 0: gradual (cubic) pruning over the first ramp_epochs sparse epochs
    ramp_every: int = 1  # epochs between the ramp's prunes
    block: list[int] | None = None  # [BH, BW]: block DSD, whole tiles pruned (DSDScheduler(block=...))
    cycles: int = 1
    optimizer: str = "sgd"  # sgd (MaskedSGD, with momentum) or adamw (MaskedAdamW, betas as torch's)
    device: str = "cpu"
    checkpoint_every: int = 0
    nproc: int = 1
    fsdp: bool = False  # --fsdp: the models sharded with FSDP2 across the --nproc processes (else DDP)
    quick: bool = False  # --quick: a smoke run (few epochs and samples), not the protocol's result

    @property
    def ramp(self) -> dict:
        """DSDScheduler's ramp arguments (none without --ramp-epochs)."""
        return {"ramp_epochs": self.ramp_epochs, "ramp_every": self.ramp_every} if self.ramp_epochs else {}

    def __post_init__(self):
        if self.epochs is None and self.protocol in DEFAULT_EPOCHS:
            self.epochs = list(DEFAULT_EPOCHS[self.protocol])
        if self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY.get(self.protocol, 0.5)
        for key, value in PROTOCOL_DEFAULTS.get(self.protocol, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        """Every argument error before anything is written or trained."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"--optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}")
        try:
            self.sparsity = as_sparsity(self.sparsity, "--sparsity", allow_one=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{err} (a fraction in [0, 1) or an N:M pattern such as 2:4)") from None
        if self.protocol == "sparse":
            unsupported = [name for name, given in (
                ("an N:M --sparsity", isinstance(self.sparsity, str)), ("--ramp-epochs", bool(self.ramp_epochs)),
                ("--cycles", self.cycles != 1), ("--fsdp", self.fsdp)) if given]
            if unsupported:
                raise ValueError(f"--protocol sparse (RigL, SET) does not take {', '.join(unsupported)}")
        if self.first_conv not in FIRST_CONV:
            raise ValueError(f"--first-conv must be one of {FIRST_CONV}, got {self.first_conv!r}")
        if self.epochs is None or len(self.epochs) != 3 or any(int(e) != e or e < 1 for e in self.epochs):
            raise ValueError(f"--epochs needs three positive integers (dense sparse redense), got {self.epochs}")
        for name in ("seeds", "batch_size", "cycles", "nproc"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.block is not None:
            try:
                checked_block(tuple(self.block) if isinstance(self.block, list) else self.block, self.sparsity,
                              self.ramp_epochs or None, "layer")
            except ValueError as err:
                raise ValueError(f"--block: {err}".replace("ramp_epochs", "--ramp-epochs")) from None
        if not self.ramp_epochs and self.ramp_every != 1:
            raise ValueError(f"--ramp-every {self.ramp_every} needs --ramp-epochs (the length of the gradual prune)")
        if self.ramp_epochs:
            try:
                check_ramp(self.ramp_epochs, self.ramp_every, self.epochs[1], self.sparsity)
            except ValueError as err:
                raise ValueError(str(err).replace("ramp_epochs", "--ramp-epochs").replace("ramp_every", "--ramp-every")
                                 .replace("sparse_epochs", "the sparse epochs of --epochs")) from None
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
    def redense_lr_factor(self) -> float:
        """The re-dense rate over `lr` (sparse_lr_scale x redense_lr_scale), the one factor every
        arm's re-dense (or its dense stand-in) runs at; a job from before the scales were
        relative keeps the factor it ran with, to the bit."""
        legacy = getattr(self, "legacy_redense_lr_factor", None)
        return legacy if legacy is not None else self.sparse_lr_scale * self.redense_lr_scale

    def phase_lrs(self) -> dict[str, float]:
        """The absolute learning rate of each DSD phase (what the report states)."""
        return {"dense": self.lr, "sparse": self.lr * self.sparse_lr_scale, "redense": self.lr * self.redense_lr_factor}

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

    @property
    def focal_arm(self) -> str:
        """The arm the report compares against each other arm."""
        return FOCAL_ARM[self.protocol]

    def data_for(self, model: str) -> str:
        return self.data if self.data is not None else MODEL_DATA[model]

    def run_epochs(self, method: str) -> int:
        """Epochs one run of `method` trains (paper: the arms after pre-training)."""
        if self.protocol in ("matched", "sparse"):
            return self.total_epochs
        dense, sparse, redense = self.epochs
        return dense if method == "baseline" else self.cycles * (sparse + redense)


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a TrainConfig field's annotation ("int", "float | str",
    "list[int] | None", ...): ints are not bools, floats take ints."""
    for part in (a.strip() for a in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part == "bool" and isinstance(value, bool):
            return True
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part.startswith("list[") and isinstance(value, list):
            return all(_has_type(v, part[5:-1]) for v in value)
    return False


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


# written into config.json: what the learning-rate scales are relative to (a file without it
# is from before: --redense-lr-scale was relative to --lr there)
LR_SCALES = "each relative to the phase before"

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
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume {out_dir}: {path} is not a train job's config ({err})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {out_dir}: {path} holds a JSON {type(saved).__name__}, not a train job's "
                         f"config (an object of settings)")
    # a job started before --first-conv existed pruned every layer (the other new settings'
    # defaults, no ramp and no FSDP, are what such a job ran with)
    saved.setdefault("first_conv", "pruned")
    legacy_factor = None
    if saved.pop("lr_scales", None) != LR_SCALES and isinstance(saved.get("redense_lr_scale"), (int, float)) \
            and isinstance(saved.get("sparse_lr_scale"), (int, float)) and saved["sparse_lr_scale"] > 0:
        legacy_factor = saved["redense_lr_scale"]
        saved["redense_lr_scale"] = legacy_factor / saved["sparse_lr_scale"]
        print(f"dsd-kernels train: {path} is from a version where --redense-lr-scale was relative to --lr; "
              f"read as --redense-lr-scale {saved['redense_lr_scale']:g} relative to the sparse rate "
              f"(re-dense at lr x {legacy_factor:g}, as the job ran)", file=sys.stderr)
    known = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ValueError(f"--resume {out_dir}: {path} has unknown key(s) {', '.join(unknown)}: not a config "
                         f"this version wrote")
    for key, value in saved.items():
        if not _has_type(value, known[key]):
            raise ValueError(f"--resume {out_dir}: {path} has {key}={value!r}, expected {known[key]}: "
                             f"the file is damaged (restore it, or start a new --out)")
    cfg = TrainConfig(**saved)  # run_job validates it (naming the file)
    if legacy_factor is not None:
        cfg.legacy_redense_lr_factor = legacy_factor
    differing = []
    for key, value in (given or {}).items():
        if key == "sparsity":  # compared as the job reads them: " 2:4" and "02:04" are "2:4"
            try:
                value = as_sparsity(value, "--sparsity", allow_one=False)
            except (TypeError, ValueError):
                pass
        if key in RESUME_MAY_CHANGE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            note = ""
            if key == "redense_lr_scale" and legacy_factor is not None:
                note = (f": its file is from before --redense-lr-scale became relative to the sparse rate; "
                        f"its re-dense rate lr x {legacy_factor:g} is --redense-lr-scale "
                        f"{cfg.redense_lr_scale:g} now")
            differing.append(f"--{key.replace('_', '-')} {value!r} (the job has {getattr(cfg, key)!r}{note})")
    if differing:
        raise ValueError(f"--resume {out_dir}: the job was started with other settings: "
                         f"{'; '.join(differing)}. Resume without them, or start a new --out")
    return cfg


