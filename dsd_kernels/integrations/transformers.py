"""DSD in the Hugging Face Trainer: `Trainer(..., callbacks=[DSDCallback(0.5, 4, 4, 2)])`; RigL and
SET: `RigLCallback(0.9, update_every=100)` (end of this module).

At train begin the callback builds a DSDScheduler over the trainer's optimizer (AdamW by
default; any torch optimizer, MaskedSGD/MaskedAdamW included) and model; at the end of every
epoch (unit="step": every optimizer step, counted by state.global_step) it advances the
schedule: prune at dense -> sparse (or gradually: ramp_epochs, ramp_every), drop the masks at
sparse -> re-dense. The phase's LR scale (sparse_lr_scale, then times redense_lr_scale) applies
around every optimizer step on top of the Trainer's schedule (linear, cosine, with warmup ...):
every step runs at the scale times the rate the schedule gives at that step (the Trainer logs
the schedule's rate as learning_rate; dsd/lr_scale in the logs is the scale). While sparse, each masked weight's gradient is zeroed as
backward accumulates it, before the Trainer clips gradients (max_grad_norm), so clipping sees
the sparse network's norm.

Checkpoints: the DSD state (position, LR scaled or not, masks of a plain optimizer) is kept as
an attribute of the Trainer's LR scheduler, whose state_dict the Trainer saves in every
checkpoint (scheduler.pt) and loads on `trainer.train(resume_from_checkpoint=...)` before
training begins: the resumed run continues in the right phase with the same masks, wherever
the checkpoint folder was moved. Phase changes are added to `trainer.state.log_history`, and
every log entry there gains dsd/phase and dsd/sparsity (so do the logs the callbacks after this
one see; the report_to integrations, which the Trainer puts before user callbacks, get the
Trainer's own learning_rate only).
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("dsd_kernels.integrations.transformers needs transformers: "
                      "pip install 'dsd-kernels[transformers]'") from error

from ..ops import apply_masks_
from ._dsd_run import DSDRun, unwrap_lr_scheduler
from ._rigl_run import RigLRun

# the LR scheduler attribute that carries the DSD state through the Trainer's checkpoints
STATE_ATTRIBUTE = "dsd_kernels_state"
RIGL_STATE_ATTRIBUTE = "dsd_kernels_rigl_state"


class DSDCallback(DSDRun, TrainerCallback):
    """Dense -> sparse -> re-dense on the Trainer's optimizer; arguments as DSDScheduler's
    (sparsity, dense/sparse/redense epochs, redense_lr_scale, cycles, unit, include, exclude,
    scope; keyword-only sparse_lr_scale, ramp_epochs, ramp_every)."""

    _lr_scheduler = None  # the Trainer's LR scheduler, which carries the DSD state
    _grad_hooks: tuple = ()  # handles of the gradient hooks in force

    # ------------------------------------------------------------ start and resume
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None or optimizer is None or lr_scheduler is None:
            raise RuntimeError("DSDCallback needs the Trainer's model, optimizer and LR scheduler at "
                               "train begin")
        self._lr_scheduler = unwrap_lr_scheduler(lr_scheduler)
        saved = getattr(self._lr_scheduler, STATE_ATTRIBUTE, None)
        resumed = state.global_step > 0
        if resumed and saved is None:
            raise RuntimeError(f"resuming at step {state.global_step}, but the checkpoint's LR scheduler "
                               f"holds no DSD state: it was saved by a run without DSDCallback")
        self.start(optimizer, model, saved if resumed else None)
        self._keep_state()
        self._hook_gradients()
        self.warn_if_short(state.max_steps if self.unit == "step" else int(args.num_train_epochs))

    def _keep_state(self) -> None:
        setattr(self._lr_scheduler, STATE_ATTRIBUTE, self.scheduler.state_dict())

    # ------------------------------------------------------------ training
    def on_step_end(self, args, state, control, **kwargs):
        if self.unit == "step":
            self._advance(state, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.unit == "epoch":
            self._advance(state, self.scheduler.epoch + 1)

    def _advance(self, state, completed: int) -> None:
        before = self.scheduler.mask_changes
        entered = self.advance_to(completed)
        self._keep_state()  # before the Trainer saves a checkpoint at this step
        if self.scheduler.mask_changes != before:  # a phase change or a step of a gradual prune
            self._hook_gradients()
        if entered:
            state.log_history.append({**self.metrics(), "dsd/entered": entered[-1], "step": state.global_step})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.scheduler is None:
            return
        metrics = self.metrics()
        # the scale, not a rate: the Trainer's learning_rate is the schedule's, logged a step late
        figures = {"dsd/phase": metrics["dsd/phase"], "dsd/sparsity": metrics["dsd/sparsity"],
                   "dsd/lr_scale": metrics["dsd/lr_scale"]}
        logs.update(figures)  # seen by the callbacks after this one (progress bar, printer)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "dsd/entered" not in last:
            last.update(figures)  # the Trainer stored its copy of `logs` before calling us

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_gradient_hooks()

    # ------------------------------------------------------------ gradients before clipping
    def _hook_gradients(self) -> None:
        """While masks are in force, zero each masked weight's pruned gradient entries right
        after backward accumulates them (the Trainer clips before any optimizer hook runs)."""
        self._remove_gradient_hooks()
        self._grad_hooks = tuple(
            param.register_post_accumulate_grad_hook(
                lambda p, keep=mask: apply_masks_([p.grad], [keep]) if p.grad is not None else None)
            for param, mask in self.scheduler.masks.items() if param.requires_grad)

    def _remove_gradient_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = ()


class RigLCallback(RigLRun, TrainerCallback):
    """RigL (growth="gradient") or SET (growth="random") on the Trainer's optimizer and model;
    arguments as RigLScheduler's, with end_step=None meaning 3/4 of the Trainer's max_steps. The
    scheduler steps at the end of every optimizer step. Each masked weight's pruned gradient is
    zeroed as backward accumulates it, before the Trainer clips (max_grad_norm); on the steps
    that update the masks the dense gradient is kept beside it, through gradient accumulation,
    for the growth. The state rides on the Trainer's LR scheduler into every checkpoint, so
    `trainer.train(resume_from_checkpoint=...)` resumes with the checkpoint's masks."""

    _lr_scheduler = None  # the Trainer's LR scheduler, which carries the RigL state
    _grad_hooks: tuple = ()  # handles of the gradient hooks in force

    def __init__(self, sparsity, **settings):
        super().__init__(sparsity, **settings)
        self._dense: dict = {}  # an update step's dense gradients, kept through accumulation

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None or optimizer is None or lr_scheduler is None:
            raise RuntimeError("RigLCallback needs the Trainer's model, optimizer and LR scheduler at train begin")
        self._lr_scheduler = unwrap_lr_scheduler(lr_scheduler)
        saved = getattr(self._lr_scheduler, RIGL_STATE_ATTRIBUTE, None)
        if state.global_step > 0 and saved is None:
            raise RuntimeError(f"resuming at step {state.global_step}, but the checkpoint's LR scheduler holds no "
                               f"RigL state: it was saved by a run without RigLCallback")
        self.start(optimizer, model, state.max_steps, saved if state.global_step > 0 else None)
        self._keep_state()
        self._hook_gradients()

    def _keep_state(self) -> None:
        setattr(self._lr_scheduler, RIGL_STATE_ATTRIBUTE, self.scheduler.state_dict())

    def _hook_gradients(self) -> None:
        self._remove_gradient_hooks()
        self._grad_hooks = tuple(param.register_post_accumulate_grad_hook(self._on_gradient)
                                 for param in self.scheduler.masks if param.requires_grad)

    def _on_gradient(self, p) -> None:
        if p.grad is None:
            return
        mask = self.scheduler.mask_of(p)
        if mask is None:
            return
        if self.scheduler.growth == "gradient" and self.scheduler.update_due(self.scheduler.step_count + 1):
            # p.grad = the masked sum so far + this micro-batch's gradient: the dense sum adds back
            # the pruned part of the previous dense sum
            previous = self._dense.get(p)
            dense = p.grad.detach().clone()
            if previous is not None:
                dense += previous * ~mask.to_bool().to(previous.device)
            self._dense[p] = dense
        apply_masks_([p.grad], [mask])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._dense:
            self.scheduler.keep_dense_gradients(self._dense)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler.update_due(self.scheduler.step_count + 1) and self._dense:
            self.scheduler.keep_dense_gradients(self._dense)
        changed = self.scheduler.step()
        self._dense = {}
        self._keep_state()  # before the Trainer saves a checkpoint at this step
        if changed:
            self._hook_gradients()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.scheduler is not None:
            logs.update({"rigl/sparsity": self.scheduler.pruned_fraction(), "rigl/updates": self.scheduler.updates})

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_gradient_hooks()

    def _remove_gradient_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = ()
