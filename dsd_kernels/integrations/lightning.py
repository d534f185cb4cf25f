"""DSD in Lightning: `trainer = L.Trainer(callbacks=[DSDCallback(0.5, 4, 4, 2)])`; RigL and SET:
`RigLCallback(0.9, update_every=100)` (end of this module).

At fit start the callback builds a DSDScheduler over the trainer's optimizer and the
LightningModule (any optimizer: AdamW, SGD, ...; MaskedSGD/MaskedAdamW hold the masks
themselves); at the end of every training epoch (unit="step": after every optimizer step,
counted by trainer.global_step) it advances the schedule: prune at dense -> sparse, drop the
masks at sparse -> re-dense. The phase's LR scale (sparse_lr_scale, then times
redense_lr_scale) applies around every optimizer step, on top of the rate the schedulers of
`configure_optimizers` set (LambdaLR, OneCycleLR, cosine, step, plateau: all compose). Gradual
pruning: ramp_epochs, ramp_every as DSDScheduler's. While sparse, the pruned gradients are zeroed in
`on_before_optimizer_step`, before Lightning clips gradients, so clipping sees the sparse
network's norm. Its state (position, LR scaled or not, masks of a plain optimizer) lives in
Lightning's checkpoints; `trainer.fit(model, ckpt_path=...)` resumes in the right phase.
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError("dsd_kernels.integrations.lightning needs Lightning: "
                      "pip install 'dsd-kernels[lightning]'") from error

from ._dsd_run import DSDRun
from ._rigl_run import RigLRun


class DSDCallback(DSDRun, pl.Callback):
    """Dense -> sparse -> re-dense on the trainer's optimizer; arguments as DSDScheduler's
    (sparsity, dense/sparse/redense epochs, redense_lr_scale, cycles, unit, include, exclude,
    scope; keyword-only sparse_lr_scale, ramp_epochs, ramp_every). Logs dsd/phase (0 dense,
    1 sparse, 2 re-dense), dsd/sparsity and dsd/lr (the rate the steps run at)."""

    _loaded: dict | None = None  # a checkpoint's state, until on_fit_start builds the schedule

    # ------------------------------------------------------------ start and resume
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"DSDCallback drives one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        self.start(trainer.optimizers[0], pl_module, self._loaded)
        self._loaded = None
        length = trainer.max_epochs if self.unit == "epoch" else trainer.max_steps
        self.warn_if_short(length if length is not None and length >= 0 else None)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scheduler is not None:  # strategies that restore after setup
            self.scheduler.load_state_dict(state_dict)
        else:
            self._loaded = dict(state_dict)

    # ------------------------------------------------------------ training
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scheduler.mask_gradients()
        # the rate this step runs at (the schedule's, times the phase's scale): logged for the
        # epoch or step that ends with it
        self._step_lr = self.scheduler.current_lr()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.unit == "step":
            self._advance(trainer, pl_module, trainer.global_step, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.unit == "epoch":
            self._advance(trainer, pl_module, self.scheduler.epoch + 1, on_step=False)

    def _advance(self, trainer, pl_module, completed: int, *, on_step: bool) -> None:
        # the values of the epoch (or step) that just ran, taken before the schedule moves on
        metrics = self.metrics()
        if getattr(self, "_step_lr", None) is not None:
            metrics["dsd/lr"] = self._step_lr
        self.advance_to(completed)
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step)


class RigLCallback(RigLRun, pl.Callback):
    """RigL (growth="gradient") or SET (growth="random") on the trainer's optimizer and the
    LightningModule; arguments as RigLScheduler's, with end_step=None meaning 3/4 of the fit's
    optimizer steps (trainer.estimated_stepping_batches). The scheduler steps after every
    optimizer step; pruned gradients are zeroed in on_before_optimizer_step, before Lightning
    clips them (the dense gradient of an update step is kept first). Its state lives in
    Lightning's checkpoints: a resumed fit keeps the checkpoint's masks. Logs rigl/sparsity and
    rigl/updates."""

    _loaded: dict | None = None  # a checkpoint's state, until on_fit_start builds the scheduler
    _offset = 0  # the trainer's steps before this scheduler's first (a second fit)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RigLCallback drives one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        self.start(trainer.optimizers[0], pl_module, int(trainer.estimated_stepping_batches), self._loaded)
        self._loaded = None

    def on_train_start(self, trainer, pl_module) -> None:
        # the trainer's steps before this scheduler's first (a second fit), once a resumed fit has
        # restored its global step
        self._offset = trainer.global_step - self.scheduler.step_count

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict)
        else:
            self._loaded = dict(state_dict)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scheduler.mask_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        target = trainer.global_step - self._offset
        if self.scheduler.step_count == target:  # accumulating gradients: no optimizer step yet
            return
        while self.scheduler.step_count < target:
            self.scheduler.step()
        pl_module.log_dict({"rigl/sparsity": self.scheduler.pruned_fraction(),
                            "rigl/updates": float(self.scheduler.updates)}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
