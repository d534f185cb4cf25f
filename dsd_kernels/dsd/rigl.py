"""RigLScheduler: dynamic sparse training, RigL (Evci et al., ICML 2020) and SET (Mocanu et al.,
2018), over any torch optimizer, on the same masks and kernels as DSD.

At construction (step 0) every selected weight is magnitude-pruned to its sparsity: uniform (each
layer round(s * N), as DSD prunes) or ERK (dsd/distribution.py; the global count exact). Call
step() once after every optimizer.step(). At step t = update_every, 2 * update_every, ... while
t < end_step, with d_t = drop_fraction / 2 * (1 + cos(pi * t / end_step)) (RigL's cosine decay),
each layer drops exactly k = round(d_t * kept) of its kept weights, those with the smallest |w|
(after the step), and grows exactly k of the weights it pruned before the update: the largest
|dense gradient| of that step's batch (growth="gradient", RigL) or uniformly at random from a
generator seeded by `seed` (growth="random", SET). ops.mask_update makes both choices, exactly,
with the selection's tie rules. The kept count never changes; dropped weights and their optimizer
state become 0; grown weights start at 0 with the state a fresh optimizer gives them.

The dense gradient is taken only for the steps that update (RigL's cost model): a step pre-hook,
registered before the masks' own, keeps a copy of the selected weights' gradients before anything
masks them, and with block=(bh, bw) the tile layers compute that step's forward and backward
dense (their pruned tiles would have no gradient through the tile-skipping matmul). Trainers that
clip gradients call mask_gradients() (it keeps the dense gradient first when an update is due).
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import Tensor

from .. import ops
from ..masks import Mask, mask_rows_cols
from .._dtensor import full_like, full_tensor, is_dtensor, local_part, local_tensor
from ..ops._common import any_dtensor, as_sparsity
from ..ops.magnitude_select import _tile_l1
from ..optim.masking import OptimizerMasks, mask_gradients_, zero_pruned
from ..scope import Selected, warn_without_model
from . import hooks, tile_layers
from .distribution import layer_pruned_counts

GROWTH = ("gradient", "random")
DISTRIBUTIONS = ("uniform", "erk")


def drop_fraction_at(step: int, drop_fraction: float, end_step: int) -> float:
    """RigL's cosine decay of the fraction of kept weights moved at an update at `step`."""
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / end_step))


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _release(handles, optimizer_masks, tile_linears) -> None:
    for handle in handles:
        handle.remove()
    if optimizer_masks is not None:
        optimizer_masks.remove()
    tile_layers.remove(tile_linears)


class RigLScheduler:
    """RigL / SET drop-and-grow over any torch optimizer (module docstring).

    With MaskedSGD / MaskedAdamW the masks live in the optimizer; with any other optimizer pass
    `model`: the selected weights are masked through OptimizerMasks. `include`, `exclude` and a
    {pattern: float} `sparsity` pick the weights as for DSDScheduler (dsd_kernels.scope).
    block=(bh, bw): whole tiles are pruned, dropped and grown (ranked by their L1 norms), and
    the selected nn.Linear layers compute through the tile-skipping matmul. state: a
    state_dict() to resume from instead of pruning at step 0, for trainers that restore the
    model's weights before the scheduler is built (the trainer callbacks)."""

    def __init__(self, optimizer, *, sparsity, end_step: int, update_every: int = 100, drop_fraction: float = 0.3,
                 growth: str = "gradient", distribution: str = "uniform", seed: int = 0,
                 model: torch.nn.Module | None = None, include=None, exclude=None,
                 block: tuple[int, int] | None = None, state: dict | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RigLScheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.end_step = _positive_int(end_step, "end_step")
        self.update_every = _positive_int(update_every, "update_every")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or \
                not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
        if growth not in GROWTH:
            raise ValueError(f"growth must be one of {GROWTH} (gradient: RigL, random: SET), got {growth!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.drop_fraction, self.growth, self.distribution, self.seed = float(drop_fraction), growth, distribution, seed
        self.block = None if block is None else tuple(block)
        if self.block is not None and (len(self.block) != 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.block)):
            raise ValueError(f"block must be None or two positive ints (rows, cols), got {block!r}")
        if self.block is not None and distribution != "uniform":
            raise ValueError("block= takes distribution='uniform' (ERK counts weights, not tiles)")
        holds_masks = all(callable(getattr(optimizer, name, None)) for name in ("set_masks", "mask_of", "prune"))
        if model is None and not holds_masks:
            raise TypeError(f"optimizer {type(optimizer).__name__} cannot hold masks: pass model= (masks are then "
                            f"applied around its step: any optimizer works), or use MaskedSGD/MaskedAdamW")
        if model is None and (include is not None or exclude is not None or isinstance(sparsity, dict)):
            raise TypeError("include, exclude and a sparsity dict need model= (the module names and types they "
                            "select by): RigLScheduler(optimizer, model=model, ...)")
        if isinstance(sparsity, str) or (isinstance(sparsity, dict) and
                                         any(isinstance(v, str) for v in sparsity.values())):
            raise ValueError("RigLScheduler takes fractions of weights; N:M patterns have no drop-and-grow here")
        if model is not None:
            from ..nn import MaskedLinear
            if any(isinstance(m, MaskedLinear) for m in model.modules()):
                raise NotImplementedError("RigLScheduler does not drive nn.sparsify's MaskedLinear modules: give it "
                                          "the plain model (block= routes nn.Linear through the tile kernel)")
            from ..scope import select_held
            self.selected = select_held(model, optimizer, sparsity, include=include, exclude=exclude)
        else:
            warn_without_model(f"RigLScheduler({type(optimizer).__name__})", stacklevel=2)
            fraction = as_sparsity(sparsity, allow_one=False)
            self.selected = [Selected(f"params[{i}]", p, fraction) for i, p in enumerate(optimizer.prunable_params())]
        for s in self.selected:
            as_sparsity(s.sparsity, allow_one=False)
        self.sharded = any_dtensor([s.param for s in self.selected])
        if self.sharded and block is not None:
            raise NotImplementedError("block= of sharded (DTensor) weights is not supported yet")
        self.sparsity = dict(sparsity) if isinstance(sparsity, dict) else as_sparsity(sparsity, allow_one=False)
        self.optimizer, self.model = optimizer, model
        self.generator = torch.Generator().manual_seed(seed)  # SET's draws (on the CPU: the same on every device)
        self.step_count = 0  # optimizer steps completed (step() calls)
        self.updates = 0  # mask updates done
        self.skipped_updates = 0  # updates due without a step's gradient (a skipped optimizer step)
        self._dense_gradients: dict[Tensor, Tensor] | None = None
        self.tile_linears: list = []
        if self.block is not None and model is not None:
            self.tile_linears, others = tile_layers.tile_layers(model, [s.param for s in self.selected])
            if others:
                warnings.warn(f"RigLScheduler(block={self.block}): {len(others)} selected layer(s) have no "
                              f"tile-skipping matmul and keep dense compute ({', '.join(others[:4])}"
                              f"{' ...' if len(others) > 4 else ''})", UserWarning, stacklevel=2)
        self._conv1d = {id(m.weight) for m in self.tile_linears if tile_layers.is_conv1d(m)}
        hooks.claim(optimizer, self)
        # the gradient hook first: it must see the gradients before OptimizerMasks masks them
        self._handles = [optimizer.register_step_pre_hook(self._keep_dense_gradients)]
        self.optimizer_masks = None if holds_masks else OptimizerMasks(
            optimizer, params=[s.param for s in self.selected])
        self._holder = optimizer if holds_masks else self.optimizer_masks
        tile_layers.install(self.tile_linears, self._mask_for_forward)
        self._finalizer = weakref.finalize(self, _release, list(self._handles), self.optimizer_masks,
                                           list(self.tile_linears))
        if state is not None:  # resuming: the weights (restored already) keep the checkpoint's masks
            self.load_state_dict(state)
        else:
            self._prune()

    def __repr__(self) -> str:
        method = "RigL" if self.growth == "gradient" else "SET"
        return (f"RigLScheduler({method}, sparsity={self.sparsity!r}, step {self.step_count}/{self.end_step}, "
                f"every {self.update_every}, id 0x{id(self):x})")

    # ------------------------------------------------------------ schedule
    def update_due(self, step: int) -> bool:
        """Whether the masks change after optimizer step number `step` (1-based)."""
        return step % self.update_every == 0 and step < self.end_step

    def drop_fraction_at(self, step: int) -> float:
        """d_t of an update after step `step`."""
        return drop_fraction_at(step, self.drop_fraction, self.end_step)

    def _wants_dense_gradient(self) -> bool:
        return self.growth == "gradient" and self.update_due(self.step_count + 1)

    def _mask_for_forward(self, p: Tensor):
        # the step before an update computes dense: its gradient ranks the pruned weights
        return None if self._wants_dense_gradient() else self._holder.mask_of(p)

    def _block_of(self, p: Tensor) -> tuple[int, int] | None:
        if self.block is None:
            return None
        return self.block[::-1] if id(p) in self._conv1d else self.block

    # ------------------------------------------------------------ masks
    @property
    def masks(self) -> dict:
        """{param: Mask} of every selected weight now."""
        return {s.param: m for s in self.selected if (m := self._holder.mask_of(s.param)) is not None}

    def mask_of(self, p: Tensor) -> Mask | None:
        """The mask of parameter p now (None: not masked), without copying the mapping."""
        return self._holder.mask_of(p)

    def pruned_fraction(self) -> float:
        """Fraction of the selected weights' elements pruned now; of sharded (FSDP2) weights, over
        every rank's shards (a collective: every rank calls it)."""
        masks = self.masks
        pruned, total = sum(m.numel - m.count() for m in masks.values()), sum(m.numel for m in masks.values())
        if self.sharded:
            counts = torch.tensor([pruned, total], dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            pruned, total = counts.tolist()
        return 0.0 if total == 0 else pruned / total

    def _prune(self) -> None:
        """Step 0: each selected weight magnitude-pruned to its share (uniform or ERK)."""
        params = [s.param for s in self.selected]
        masks = {}
        if self.block is not None:
            for s in self.selected:
                masks[s.param] = ops.magnitude_masks(s.param, s.sparsity, block=self._block_of(s.param))[0]
        else:
            counts = layer_pruned_counts([tuple(p.shape) for p in params], [s.sparsity for s in self.selected],
                                         self.distribution)
            by_device: dict[torch.device, list[int]] = {}
            for i, p in enumerate(params):
                by_device.setdefault(p.device, []).append(i)
            for index in by_device.values():
                found = ops.magnitude_masks([params[i] for i in index],
                                            [counts[i] / params[i].numel() for i in index])
                masks.update({params[i]: m for i, m in zip(index, found)})
        self._holder.set_masks(masks)

    @torch.no_grad()
    def _keep_dense_gradients(self, optimizer, args, kwargs) -> None:
        if self.growth != "gradient" or not self.update_due(self.step_count + 1) or self._dense_gradients is not None:
            return
        self._dense_gradients = {s.param: (s.param.grad.detach().clone() if s.param.grad is not None
                                           else torch.zeros_like(s.param)) for s in self.selected}

    def keep_dense_gradients(self, gradients: dict) -> None:
        """Hand the scheduler the dense gradients ({param: tensor}) of the step about to run, for
        trainers whose gradients are masked before the optimizer's hooks see them (the Hugging
        Face callback keeps them through gradient accumulation); used if an update is due."""
        if self.growth == "gradient" and self.update_due(self.step_count + 1):
            self._dense_gradients = dict(gradients)

    def mask_gradients(self) -> None:
        """Zero the pruned entries of the selected weights' gradients now (for trainers that clip
        or log gradients before the step); the dense gradient of an update step is kept first."""
        self._keep_dense_gradients(self.optimizer, (), {})
        mask_gradients_(self.masks)

    def step(self) -> bool:
        """Call once after every optimizer.step(). Returns whether the masks changed."""
        step = self.step_count + 1
        due = self.update_due(step)
        gradients, self._dense_gradients = self._dense_gradients, None
        if due and self.growth == "gradient" and gradients is None:
            warnings.warn(f"RigLScheduler: no gradient of step {step} was seen (the optimizer did not step, e.g. "
                          f"a GradScaler skipped it): the update of step {step} is skipped", UserWarning,
                          stacklevel=2)
            self.skipped_updates += 1
            due = False
        if due:
            self._update(step, gradients)
        self.step_count = step
        return due

    @torch.no_grad()
    def _update(self, step: int, gradients: dict | None) -> None:
        fraction = self.drop_fraction_at(step)
        current = self.masks
        params = [s.param for s in self.selected]
        if self.growth == "random":  # one draw per weight in a fixed order: resumable, device-independent
            # (sharded weights: the whole layer's draws, the same on every rank)
            scores = {p: torch.rand(p.shape, generator=self.generator, dtype=torch.float64).to(local_tensor(p).device)
                      for p in params}
        else:
            scores = gradients
        new = {}
        for p in params:
            mask, block = current[p], self._block_of(p)
            if block is None and is_dtensor(p):
                # sharded: the layer gathered whole on every rank (identical there), updated as one
                # tensor with its exact global count, and each rank keeps its own rows
                keep = full_like(mask.to_bool(), p)
                k = round(fraction * int(keep.sum()))
                whole = ops.mask_update(full_tensor(p.detach()), full_tensor(scores[p]).to(keep.device),
                                        [Mask.from_bool(keep)], [k])[0]
                new[p] = Mask.from_bool(local_part(whole.to_bool(), p))
                continue
            if block is None:
                k = round(fraction * mask.count())
                new[p] = ops.mask_update(p, scores[p], [mask], [k])[0]
                continue
            # whole tiles: kept tiles ranked by the weights' L1, pruned ones by the scores' L1
            tile_keep = _tile_l1(mask.to_bool().to(p.dtype), *block) > 0
            k = round(fraction * int(tile_keep.sum()))
            tiles = ops.mask_update(_tile_l1(p, *block), _tile_l1(scores[p], *block),
                                    [Mask.from_bool(tile_keep)], [k])[0].to_bool()
            rows, cols = mask_rows_cols(p.shape)
            keep = tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
            new[p] = Mask.from_bool(keep.reshape(p.shape))
        grown = {p: new[p].to_bool() & ~current[p].to_bool() for p in params}
        self._holder.set_masks(new)  # dropped weights and their state to 0
        for p, where in grown.items():
            local_tensor(p).masked_fill_(where.to(local_tensor(p).device), 0)  # grown weights start at exactly 0
        if self.optimizer_masks is not None:
            self.optimizer_masks.restart_(grown)  # with the state a fresh optimizer of its class holds
        else:  # MaskedSGD / MaskedAdamW: fresh state is 0 (momentum, moments)
            zero_pruned(self.optimizer, {p: Mask.from_bool(~where) for p, where in grown.items()}, params=False)
        self.updates += 1

    def close(self) -> None:
        """Remove the scheduler's hooks (the gradient hook, the masks' hooks, the tile forwards)."""
        self._finalizer()
        hooks.release_claim(self.optimizer, self)

    # ------------------------------------------------------------ checkpoints
    def _settings(self) -> dict:
        return {"sparsity": self.sparsity, "end_step": self.end_step, "update_every": self.update_every,
                "drop_fraction": self.drop_fraction, "growth": self.growth, "distribution": self.distribution,
                "seed": self.seed, "block": None if self.block is None else list(self.block),
                "selected": [s.name for s in self.selected]}

    def state_dict(self) -> dict:
        """The position (steps, updates), the settings, SET's generator state and, with a plain
        optimizer, the masks by parameter index (MaskedSGD/MaskedAdamW keep them in their own
        state dict; OptimizerMasks also writes them into the optimizer's)."""
        state = {"step_count": self.step_count, "updates": self.updates, "skipped_updates": self.skipped_updates,
                 "generator": self.generator.get_state(), **self._settings()}
        if self.optimizer_masks is not None and not self.sharded:
            # (sharded: only in the optimizer's state dict, whose "mask" entries DCP reshards)
            # copies: the optimizer's state dict holds byte views of the same words, and torch.save
            # refuses one storage under two dtypes (a trainer saves both in one checkpoint)
            state["masks"] = {i: {**m, "packed": m["packed"].clone()}
                              for i, m in self.optimizer_masks.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the position, the generator and the masks; the settings must be this
        scheduler's (a ValueError naming the key), checked before anything changes."""
        for key, value in self._settings().items():
            if key in state and state[key] != value:
                raise ValueError(f"RigLScheduler state has {key}={state[key]!r}, this scheduler {value!r}: "
                                 f"build the scheduler with the saved settings")
        missing = [k for k in ("step_count", "generator") if k not in state]
        if missing:
            raise ValueError(f"RigLScheduler state lacks {', '.join(missing)}: not a RigLScheduler.state_dict()")
        if self.optimizer_masks is not None and "masks" in state:
            self.optimizer_masks.load_state_dict(state["masks"])
        self.generator.set_state(state["generator"])
        self.step_count, self.updates = int(state["step_count"]), int(state.get("updates", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self._dense_gradients = None
