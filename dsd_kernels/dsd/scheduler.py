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
- gradual pruning (ramp_epochs=R, ramp_every=E): instead of one prune, n = R/E prunes at the
  starts of sparse units 0, E, ..., R-E, the k-th to s_k = s * (1 - (1 - k/n)^3) (Zhu & Gupta's
  cubic schedule); a mask only grows (the survivors' smallest |w| are pruned on top).
- sparse -> redense: the masks are dropped; pruned weights restart from exactly 0 with fresh
  optimizer state.
- learning rates: every step runs at the rate in its param group times the phase's scale:
  1 while dense, sparse_lr_scale in the first sparse phase, sparse_lr_scale * redense_lr_scale
  from the first re-dense on (the paper's ladder is sparse_lr_scale=0.1, redense_lr_scale=0.1).
  The scale is applied around each optimizer step (step hooks) rather than written into the
  groups, so it composes with every torch LR scheduler (LambdaLR, OneCycleLR, cosine,
  SequentialLR, ReduceLROnPlateau, Hugging Face's schedules): they keep setting group["lr"],
  and the step multiplies what they set. `lr_scale` is the factor in force.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch

from ..ops._common import any_dtensor, as_sparsity
from ..scope import warn_without_model
from ..optim.masking import mask_gradients_, zero_pruned
from . import hooks, scheduler_state, tile_layers
from .lr_scales import StepRateScale
from .plan import checked_block, checked_plan, ramp_fraction

class DSDScheduler:
    """Dense -> sparse -> re-dense over any torch optimizer.

    With MaskedSGD the masks live in the optimizer (its fused step keeps pruned weights and
    momentum at 0). With any other optimizer pass `model`: its selected weights are masked
    through `OptimizerMasks` (gradients and weights re-masked around every step), except the
    weights of MaskedLinear modules (nn.sparsify), whose masks go into the modules for their
    tile-skipping matmuls. `include`, `exclude` and `sparsity` as a {pattern: float} dict pick
    the weights (see dsd_kernels.scope; they need `model`); scope="global" prunes with one
    threshold over all of them. `sparsity` may be an "N:M" pattern ("2:4"). ramp_epochs and
    ramp_every: gradual (cubic) pruning inside the sparse phase. unit="step": the phase
    lengths count optimizer steps and step() is called after every optimizer step instead of
    every epoch. The learning-rate scales apply around every optimizer step (module docstring).
    """

    def __init__(self, optimizer, *, dense_epochs: int, sparse_epochs: int, redense_epochs: int,
                 sparsity, redense_lr_scale: float = 0.1, sparse_lr_scale: float = 1.0, cycles: int = 1,
                 ramp_epochs: int | None = None, ramp_every: int | None = None,
                 lr_scheduler=None, model: torch.nn.Module | None = None, include=None, exclude=None,
                 scope: str = "layer", unit: str = "epoch", block: tuple[int, int] | None = None):
        self.plan = checked_plan(dense_epochs, sparse_epochs, redense_epochs, cycles, unit=unit, scope=scope,
                                 redense_lr_scale=redense_lr_scale, sparse_lr_scale=sparse_lr_scale,
                                 ramp_epochs=ramp_epochs, ramp_every=ramp_every, sparsity=sparsity)
        self.block = checked_block(block, sparsity, ramp_epochs, scope)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DSDScheduler needs a torch.optim.Optimizer (its step hooks carry the masks and the "
                            f"learning-rate scales), got {type(optimizer).__name__}")
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
            warn_without_model(f"DSDScheduler({type(optimizer).__name__})", stacklevel=2)
        if lr_scheduler is not None:
            warnings.warn("DSDScheduler(lr_scheduler=...) is no longer needed and is ignored: the phase's "
                          "learning-rate scale now applies around every optimizer step, on top of whatever "
                          "the LR scheduler sets", FutureWarning, stacklevel=2)
        self.model, self.include, self.exclude, self.scope = model, include, exclude, scope
        self.selected = None
        if model is not None:  # checked now: every argument error before training starts
            from ..scope import select_held
            self.selected = select_held(model, optimizer, sparsity, include=include, exclude=exclude)
        self.sparsity = sparsity if isinstance(sparsity, dict) else as_sparsity(sparsity, allow_one=False)
        if ramp_epochs is not None:
            params = [s.param for s in self.selected] if self.selected is not None else optimizer.prunable_params()
            if any_dtensor(params):
                raise NotImplementedError("gradual pruning (ramp_epochs) of sharded (DTensor) weights is not "
                                          "supported yet: prune them at once (no ramp)")
        self.masked_linears: list = []
        self.optimizer_masks = None
        if not holds_masks:
            from ..nn import MaskedLinear
            from ..optim.masking import OptimizerMasks
            in_modules = {id(m.weight): m for m in model.modules() if isinstance(m, MaskedLinear)}
            self.masked_linears = [in_modules[id(s.param)] for s in self.selected if id(s.param) in in_modules]
            self.optimizer_masks = OptimizerMasks(
                optimizer, params=[s.param for s in self.selected if id(s.param) not in in_modules])
        self.optimizer = optimizer
        self.unit = unit
        self.dense_epochs, self.sparse_epochs = dense_epochs, sparse_epochs
        self.redense_epochs, self.cycles = redense_epochs, cycles
        self.ramp_epochs = ramp_epochs
        self.ramp_every = None if ramp_epochs is None else (1 if ramp_every is None else ramp_every)
        self.sparse_lr_scale = float(sparse_lr_scale)
        self.redense_lr_scale = float(redense_lr_scale)
        self.epoch = 0  # epochs (unit="step": steps) completed
        self.mask_changes = 0  # prunes and re-denses so far (the masks change at each)
        # a state saved before the scales moved into step hooks has the re-dense scale in the groups
        self._groups_hold_redense_scale = False
        from ..scope import check_selection
        selected = self._selected_now(1.0)
        check_selection(selected, scope)  # N:M rows, global scope, FSDP: before any training
        self.tile_linears: list = []  # block=: the nn.Linear layers computing through masked_linear while masked
        if self.block is not None:
            params = [s.param for s in selected]
            if any_dtensor(params):
                raise NotImplementedError("block pruning of sharded (DTensor) weights is not supported yet")
            if model is not None:
                self.tile_linears, others = tile_layers.tile_layers(model, params)
                if others:
                    warnings.warn(f"DSDScheduler(block={self.block}): {len(others)} selected layer(s) have no "
                                  f"tile-skipping matmul and keep dense compute ({', '.join(others[:4])}"
                                  f"{' ...' if len(others) > 4 else ''}): their tiles are pruned exactly through "
                                  f"the optimizer, with no speedup; only nn.Linear layers skip pruned tiles",
                                  UserWarning, stacklevel=2)
        hooks.claim(optimizer, self)
        self._attach()

    def _attach(self) -> None:
        """The step hooks of the rate scales (the masks' are the OptimizerMasks') and the tile
        layers' forwards, removed by close() or when the scheduler is collected: a scheduler that
        is gone masks nothing."""
        self._rate_scale = StepRateScale(self.optimizer, self._lr_scale_now)
        holder = self.optimizer if self.optimizer_masks is None else self.optimizer_masks
        tile_layers.install(self.tile_linears, holder.mask_of)
        self._finalizer = weakref.finalize(self, hooks.release_hooks, self._rate_scale, self.optimizer_masks,
                                           list(self.tile_linears))

    # copies (copy.deepcopy, pickle) own their own hooks, on the copied optimizer
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_rate_scale", "_finalizer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        hooks.claim(self.optimizer, self)
        self._attach()

    def __repr__(self) -> str:
        sparsity = self.sparsity if not isinstance(self.sparsity, dict) else dict(self.sparsity)
        return (f"DSDScheduler(epochs {self.dense_epochs}/{self.sparse_epochs}/{self.redense_epochs}, "
                f"sparsity={sparsity!r}, at epoch {self.epoch}, {self.phase}, id 0x{id(self):x})")

    # ------------------------------------------------------------ schedule
    @property
    def total_epochs(self) -> int:
        """Epochs (unit="step": steps) of the whole plan, every cycle."""
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

    @property
    def lr_scaled(self) -> bool:
        """Whether the first re-dense has begun (the re-dense scale is in force from then on)."""
        return self.epoch >= self.dense_epochs + self.sparse_epochs

    @property
    def lr_scale(self) -> float:
        """The factor every optimizer step applies to its groups' rates now."""
        return self._lr_scale_now()

    def current_lr(self) -> float:
        """The rate the first param group's steps run at now: its own (LR schedule's) rate times
        lr_scale, also when asked during a step (which runs at the scaled rate)."""
        return self._rate_scale.base_rate(self.optimizer.param_groups[0]) * self.lr_scale

    def _lr_scale_now(self) -> float:
        redense = self.sparse_lr_scale * (1.0 if self._groups_hold_redense_scale else self.redense_lr_scale)
        return self.plan.lr_scale(self.epoch, self.sparse_lr_scale, redense)

    def ramp_updates(self) -> list[tuple[int, float]]:
        """[(sparse unit, sparsity share)] of a gradual prune: at the start of each listed unit of
        every sparse phase, the weights are pruned to share * sparsity ([(0, 1.0)] without a ramp)."""
        if self.ramp_epochs is None:
            return [(0, 1.0)]
        updates = self.ramp_epochs // self.ramp_every
        return [((k - 1) * self.ramp_every, ramp_fraction(k, updates)) for k in range(1, updates + 1)]

    def step(self) -> str | None:
        """Call once at the end of every epoch. Returns the phase entered, if one starts now."""
        if self.epoch >= self.total_epochs:
            raise RuntimeError(f"DSDScheduler.step() called after the last of {self.total_epochs} epochs")
        # the epoch advances only once the masks have changed: a step that raises changes nothing
        before, epoch = self.phase_at(self.epoch), self.epoch + 1
        after = self.phase_at(epoch)
        if epoch >= self.total_epochs:
            self.epoch = epoch
            return None
        if after == "sparse":
            offset = (epoch - self.dense_epochs) % (self.sparse_epochs + self.redense_epochs)
            share = dict(self.ramp_updates()).get(offset)
            if share is not None:
                self._prune(share)
        elif after != before:
            self._redense()
        self.epoch = epoch
        return after if after != before else None

    def _selected_now(self, share: float) -> list:
        """The weights to prune, each at `share` of its final sparsity."""
        from ..scope import Selected
        if self.selected is None:  # MaskedSGD / MaskedAdamW on their own parameters
            selected = [Selected(f"params[{i}]", p, self.sparsity)
                        for i, p in enumerate(self.optimizer.prunable_params())]
        else:
            selected = self.selected
        if share == 1.0:
            return selected
        return [dataclasses.replace(s, sparsity=s.sparsity * share) for s in selected]

    def _prune(self, share: float = 1.0) -> None:
        from ..scope import grown_masks, masks_for
        selected = self._selected_now(share)
        if self.block is not None:  # whole tiles, at once (no ramp)
            # (bh, bw) are rows x columns of the weight as nn.Linear holds it, (out, in): a Conv1D's
            # weight is stored (in, out), so its tiles are (bw, bh) of the stored tensor
            stored_in_out = {id(m.weight) for m in self.tile_linears if tile_layers.is_conv1d(m)}
            masks = masks_for([s for s in selected if id(s.param) not in stored_in_out], scope=self.scope,
                              block=self.block)
            masks.update(masks_for([s for s in selected if id(s.param) in stored_in_out], scope=self.scope,
                                   block=self.block[::-1]))
        else:
            masks = grown_masks(selected, self.masks, scope=self.scope)  # without masks yet: masks_for
        self.mask_changes += 1
        if self.optimizer_masks is None:
            self.optimizer.set_masks(masks)
            return
        for module in self.masked_linears:
            mask = masks.pop(module.weight)
            module.set_mask(mask)  # zeroes the pruned weights
            zero_pruned(self.optimizer, {module.weight: mask}, params=False)
        self.optimizer_masks.set_masks(masks)

    def _redense(self) -> None:
        self.mask_changes += 1
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

    def close(self) -> None:
        """Remove the scheduler's step hooks (the learning-rate scales and, with a plain
        optimizer, the masks): the optimizer steps as if it never had one; another
        DSDScheduler may then take it."""
        self._finalizer()
        hooks.release_claim(self.optimizer, self)

    # ------------------------------------------------------------ masks in force
    @property
    def masks(self) -> dict:
        """{param: Mask} of every weight pruned now (empty while dense)."""
        if self.optimizer_masks is None:
            return dict(self.optimizer.masks)
        held = {m.weight: m.mask for m in self.masked_linears if m.mask is not None}
        return {**self.optimizer_masks.masks, **held}

    def pruned_fraction(self) -> float:
        """Fraction of the masked weights' elements pruned now (0.0 while dense); of sharded (FSDP2)
        weights, over every rank's shards (a collective: every rank calls it)."""
        masks = self.masks
        pruned, total = sum(m.numel - m.count() for m in masks.values()), sum(m.numel for m in masks.values())
        params = list(masks) if masks else ([s.param for s in self.selected] if self.selected is not None else [])
        if any_dtensor(params):
            counts = torch.tensor([pruned, total], dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            pruned, total = counts.tolist()
        return 0.0 if total == 0 else pruned / total

    def mask_gradients(self) -> None:
        """Zero the pruned entries of the masked weights' gradients now, in one fused pass: for
        trainers that clip or log gradients between backward and the optimizer step, so the
        norm they see is the sparse network's."""
        mask_gradients_(self.masks)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The schedule's position and plan; with a plain optimizer, also its masks (MaskedSGD
        keeps them in its own state_dict, MaskedLinear modules in the model's)."""
        return scheduler_state.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule's position; the whole state is checked against this scheduler's
        settings (a ValueError naming the key) before anything changes."""
        epoch, scales, groups_hold_redense_scale = scheduler_state.checked(self, state)
        if self.optimizer_masks is not None and "masks" in state:
            self.optimizer_masks.load_state_dict(state["masks"])
        self.epoch = epoch
        self.sparse_lr_scale, self.redense_lr_scale = scales
        self._groups_hold_redense_scale = groups_hold_redense_scale
