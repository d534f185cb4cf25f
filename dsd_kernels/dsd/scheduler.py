"""DSDScheduler: Dense -> Sparse -> re-Dense phases, stepped once per epoch (or, with
unit="step", once per optimizer step) like an LR scheduler.

Epochs 0 .. dense_epochs-1 are dense; then `cycles` times: sparse_epochs sparse epochs
followed by redense_epochs re-dense epochs (cycles=2 gives DSDSD).
- dense -> sparse: the selected weights (dsd_kernels.scope: by default every weight of 2 or
  more dims but embeddings and norms) are magnitude-pruned, exactly round(s*N) per layer (or
  over all of them with scope="global"). MaskedSGD and MaskedAdamW hold the masks themselves;
  any other optimizer gets them through optim.OptimizerMasks (gradients and weights re-masked
  around every step), and MaskedLinear modules keep theirs. Pruned weights and their optimizer
  state become 0 and stay 0 while sparse.
- sparse -> redense: the masks are dropped; pruned weights restart from exactly 0 with fresh
  optimizer state, and every group's learning rate is multiplied by redense_lr_scale
  (once, at the first re-dense: 1/10 of the dense phase's rate by default). Nothing else
  changes. The multiplication composes with a chainable torch LR scheduler; pass a
  closed-form one (LambdaLR, CosineAnnealingLR, ...) as `lr_scheduler` (one or a list) so
  that its base_lrs (and the groups' initial_lr) are scaled too: the rate it sets at every
  later step is then redense_lr_scale times what it would have set.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..ops._common import as_sparsity
from ..optim.masking import mask_gradients_, zero_pruned

PHASES = ("dense", "sparse", "redense")


@dataclass(frozen=True)
class PhasePlan:
    """The DSD epoch plan: `dense` epochs, then `cycles` times `sparse` then `redense` epochs.
    The one definition of which phase an epoch is in (scheduler, train job and report use it)."""
    dense: int
    sparse: int
    redense: int
    cycles: int = 1

    def __post_init__(self):
        for name in ("dense", "sparse", "redense", "cycles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                label = name if name == "cycles" else f"{name}_epochs"
                raise ValueError(f"{label} must be a positive integer, got {value!r}")

    @property
    def total_epochs(self) -> int:
        return self.dense + self.cycles * (self.sparse + self.redense)

    def phase_at(self, epoch: int) -> str:
        """Phase of 0-based epoch `epoch` ("dense" past the end: training is over)."""
        if epoch < self.dense or epoch >= self.total_epochs:
            return "dense"
        offset = (epoch - self.dense) % (self.sparse + self.redense)
        return "sparse" if offset < self.sparse else "redense"

    def length(self, phase: str) -> int:
        """Epochs in one `phase` ("dense", "sparse" or "redense")."""
        return {"dense": self.dense, "sparse": self.sparse, "redense": self.redense}[phase]

    def phases(self) -> list[tuple[str, int, int]]:
        """[(phase, first epoch, number of epochs)] in order."""
        plan = [("dense", 0, self.dense)]
        start = self.dense
        for _ in range(self.cycles):
            plan += [("sparse", start, self.sparse), ("redense", start + self.sparse, self.redense)]
            start += self.sparse + self.redense
        return plan


def _warn_no_model(optimizer_name: str) -> None:
    warnings.warn(f"DSDScheduler({optimizer_name}) without model=: every weight of 2 or more dims the optimizer "
                  f"holds is pruned, embeddings and norms included, since module types cannot be known; pass "
                  f"model=your_model for the default scope (Linear, Conv and other weights; never embeddings or "
                  f"norms), as the trainer callbacks use", UserWarning, stacklevel=3)


def checked_plan(dense_epochs, sparse_epochs, redense_epochs, cycles, *, unit, scope,
                 redense_lr_scale) -> PhasePlan:
    """The schedule's arguments checked (one set of errors for DSDScheduler and the trainer
    callbacks, which check them when built, before any optimizer exists); the PhasePlan."""
    plan = PhasePlan(dense_epochs, sparse_epochs, redense_epochs, cycles)
    if unit not in ("epoch", "step"):
        raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(redense_lr_scale, bool) or not isinstance(redense_lr_scale, (int, float)) \
            or not (math.isfinite(redense_lr_scale) and redense_lr_scale > 0):
        raise ValueError(f"redense_lr_scale must be a positive finite number, got {redense_lr_scale!r}")
    return plan


class DSDScheduler:
    """Dense -> sparse -> re-dense over any torch optimizer.

    With MaskedSGD the masks live in the optimizer (its fused step keeps pruned weights and
    momentum at 0). With any other optimizer pass `model`: its selected weights are masked
    through `OptimizerMasks` (gradients and weights re-masked around every step), except the
    weights of MaskedLinear modules (nn.sparsify), whose masks go into the modules for their
    tile-skipping matmuls. `include`, `exclude` and `sparsity` as a {pattern: float} dict pick
    the weights (see dsd_kernels.scope; they need `model`); scope="global" prunes with one
    threshold over all of them. unit="step": the phase lengths count optimizer steps and
    step() is called after every optimizer step instead of every epoch.
    """

    def __init__(self, optimizer, *, dense_epochs: int, sparse_epochs: int, redense_epochs: int,
                 sparsity, redense_lr_scale: float = 0.1, cycles: int = 1,
                 lr_scheduler=None, model: torch.nn.Module | None = None, include=None, exclude=None,
                 scope: str = "layer", unit: str = "epoch"):
        self.plan = checked_plan(dense_epochs, sparse_epochs, redense_epochs, cycles, unit=unit, scope=scope,
                                 redense_lr_scale=redense_lr_scale)
        holds_masks = callable(getattr(optimizer, "prune", None)) and \
            callable(getattr(optimizer, "set_masks", None)) and callable(getattr(optimizer, "clear_masks", None))
        if model is None and not holds_masks:
            raise TypeError(f"optimizer {type(optimizer).__name__} cannot hold masks: pass model= (masks are "
                            f"then applied around its step: any optimizer works), or use MaskedSGD/MaskedAdamW")
        if model is None:
            needs_model = [name for name, given in (("include", include is not None), ("exclude", exclude is not None),
                                                    ("a sparsity dict", isinstance(sparsity, dict)),
                                                    (f"scope={scope!r}", scope != "layer")) if given]
            if needs_model:
                raise TypeError(f"{' and '.join(needs_model)} need model= (the module names and types they "
                                f"select by): DSDScheduler(optimizer, model=model, ...)")
            _warn_no_model(type(optimizer).__name__)
        self.model, self.include, self.exclude, self.scope = model, include, exclude, scope
        self.selected = None
        if model is not None:  # checked now: every argument error before training starts
            from ..scope import select
            self.selected = select(model, sparsity, include=include, exclude=exclude)
            if not self.selected:
                raise ValueError("the scope selects no weight of the model to prune (include, exclude and sparsity "
                                 "together); see dk.summary(model) for the weights and their module types")
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [s.name for s in self.selected if id(s.param) not in held]
            if missing:
                raise ValueError(f"the optimizer does not hold {', '.join(missing[:3])}"
                                 f"{' ...' if len(missing) > 3 else ''}, selected for pruning")
        self.sparsity = sparsity if isinstance(sparsity, dict) else as_sparsity(sparsity, allow_one=False)
        self.masked_linears: list = []
        self.optimizer_masks = None
        if not holds_masks:
            from ..nn import MaskedLinear
            from ..optim.masking import OptimizerMasks
            in_modules = {id(m.weight): m for m in model.modules() if isinstance(m, MaskedLinear)}
            self.masked_linears = [in_modules[id(s.param)] for s in self.selected if id(s.param) in in_modules]
            self.optimizer_masks = OptimizerMasks(optimizer)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.unit = unit
        self.dense_epochs, self.sparse_epochs = dense_epochs, sparse_epochs
        self.redense_epochs, self.cycles = redense_epochs, cycles
        self.redense_lr_scale = float(redense_lr_scale)
        self.epoch = 0  # epochs (unit="step": steps) completed
        self.lr_scaled = False

    # ------------------------------------------------------------ schedule
    @property
    def total_epochs(self) -> int:
        return self.plan.total_epochs

    def phase_at(self, epoch: int) -> str:
        """Phase of 0-based epoch `epoch` ("dense" past the end: training is over)."""
        return self.plan.phase_at(epoch)

    @property
    def phase(self) -> str:
        """Phase of the epoch about to run."""
        return self.phase_at(self.epoch)

    def phase_plan(self) -> list[tuple[str, int, int]]:
        """[(phase, first epoch, number of epochs)] in order."""
        return self.plan.phases()

    def step(self) -> str | None:
        """Call once at the end of every epoch. Returns the phase entered, if one starts now."""
        if self.epoch >= self.total_epochs:
            raise RuntimeError(f"DSDScheduler.step() called after the last of {self.total_epochs} epochs")
        before = self.phase_at(self.epoch)
        self.epoch += 1
        after = self.phase_at(self.epoch)
        if self.epoch >= self.total_epochs or after == before:
            return None
        if after == "sparse":
            self._prune()
        else:
            self._redense()
            if not self.lr_scaled:
                self._scale_lr(self.redense_lr_scale)
                self.lr_scaled = True
        return after

    def _prune(self) -> None:
        if self.selected is None:  # MaskedSGD on its own parameters
            self.optimizer.prune(self.sparsity)
            return
        from ..scope import masks_for
        masks = masks_for(self.selected, scope=self.scope)
        if self.optimizer_masks is None:
            self.optimizer.set_masks(masks)
            return
        for module in self.masked_linears:
            mask = masks.pop(module.weight)
            module.set_mask(mask)  # zeroes the pruned weights
            zero_pruned(self.optimizer, {module.weight: mask}, params=False)
        self.optimizer_masks.set_masks(masks)

    def _redense(self) -> None:
        if self.optimizer_masks is None:
            self.optimizer.clear_masks()
            return
        self.optimizer_masks.clear_masks()
        for module in self.masked_linears:
            mask = module.mask
            if mask is not None:
                with torch.no_grad():
                    mask.apply_(module.weight)  # pruned weights restart from exactly 0
                zero_pruned(self.optimizer, {module.weight: mask}, params=False)
                module.set_mask(None)

    def _scale_lr(self, scale: float) -> None:
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr"):  # initial_lr: where a re-created LR scheduler starts
                if key in group:
                    lr = group[key]
                    group[key] = lr * scale if not isinstance(lr, torch.Tensor) else lr.mul_(scale)
        schedulers = self.lr_scheduler if isinstance(self.lr_scheduler, (list, tuple)) else [self.lr_scheduler]
        for scheduler in schedulers:
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]

    # ------------------------------------------------------------ masks in force
    @property
    def masks(self) -> dict:
        """{param: Mask} of every weight pruned now (empty while dense)."""
        if self.optimizer_masks is None:
            return dict(self.optimizer.masks)
        held = {m.weight: m.mask for m in self.masked_linears if m.mask is not None}
        return {**self.optimizer_masks.masks, **held}

    def pruned_fraction(self) -> float:
        """Fraction of the masked weights' elements pruned now (0.0 while dense)."""
        masks = self.masks
        total = sum(m.numel for m in masks.values())
        return 0.0 if total == 0 else sum(m.numel - m.count() for m in masks.values()) / total

    def mask_gradients(self) -> None:
        """Zero the pruned entries of the masked weights' gradients now, in one fused pass: for
        trainers that clip or log gradients between backward and the optimizer step, so the
        norm they see is the sparse network's."""
        mask_gradients_(self.masks)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The schedule's position and plan; with a plain optimizer, also its masks (MaskedSGD
        keeps them in its own state_dict, MaskedLinear modules in the model's)."""
        state = {"epoch": self.epoch, "lr_scaled": self.lr_scaled, "dense_epochs": self.dense_epochs,
                 "sparse_epochs": self.sparse_epochs, "redense_epochs": self.redense_epochs,
                 "cycles": self.cycles, "sparsity": self.sparsity,
                 "redense_lr_scale": self.redense_lr_scale, "unit": self.unit}
        if self.optimizer_masks is not None:
            state["masks"] = self.optimizer_masks.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule's position; the whole state is checked (a ValueError naming the
        key) before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = [k for k in ("epoch", "lr_scaled", "dense_epochs", "sparse_epochs", "redense_epochs", "cycles",
                               "sparsity", "redense_lr_scale") if k not in state]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(missing)}: not a DSDScheduler state")
        plan = ("dense_epochs", "sparse_epochs", "redense_epochs", "cycles", "sparsity")
        for key in plan:
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r} but this scheduler has "
                                 f"{getattr(self, key)!r}")
        if state.get("unit", "epoch") != self.unit:
            raise ValueError(f"state_dict has unit={state.get('unit', 'epoch')!r} but this scheduler "
                             f"has {self.unit!r}")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= self.total_epochs:
            raise ValueError(f"state_dict has epoch={epoch!r}: expected an int in [0, {self.total_epochs}]")
        if not isinstance(state["lr_scaled"], bool):
            raise ValueError(f"state_dict has lr_scaled={state['lr_scaled']!r}: expected a bool")
        scale = state["redense_lr_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"state_dict has redense_lr_scale={scale!r}: expected a positive finite number")
        if self.optimizer_masks is not None:
            self.optimizer_masks.load_state_dict(state.get("masks", {}))
        self.epoch = epoch
        self.lr_scaled = state["lr_scaled"]
        self.redense_lr_scale = float(scale)
