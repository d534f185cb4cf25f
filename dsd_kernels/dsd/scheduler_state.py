"""DSDScheduler's state dict: what it saves (the schedule's position and settings; with a plain
optimizer in one process, the masks too) and the checks of a state against the scheduler that
loads it, every one before anything changes."""
from __future__ import annotations

import math

from ..ops._common import any_dtensor

PLAN_KEYS = ("dense_epochs", "sparse_epochs", "redense_epochs", "cycles", "sparsity")


def state_dict(scheduler) -> dict:
    s = scheduler
    state = {"epoch": s.epoch, "lr_scaled": s.lr_scaled, "dense_epochs": s.dense_epochs,
             "sparse_epochs": s.sparse_epochs, "redense_epochs": s.redense_epochs,
             "cycles": s.cycles, "sparsity": s.sparsity, "ramp_epochs": s.ramp_epochs,
             "ramp_every": s.ramp_every, "sparse_lr_scale": s.sparse_lr_scale,
             "redense_lr_scale": s.redense_lr_scale, "unit": s.unit, "lr_scales": "step_hooks",
             "groups_hold_redense_scale": s._groups_hold_redense_scale, "scope": s.scope,
             "selected": _selected_names(s), "block": None if s.block is None else list(s.block)}
    if s.optimizer_masks is not None and not any_dtensor([x.param for x in s.selected]):
        # one process: the masks here too (trainers may restore the optimizer before this);
        # sharded: only in the optimizer's state dict, whose "mask" entries DCP reshards
        state["masks"] = _mask_entries(s)
    return state


def _selected_names(scheduler) -> list[str] | None:
    return None if scheduler.selected is None else [x.name for x in scheduler.selected]


def _mask_entries(scheduler) -> dict:
    """{parameter index: "mask" entry} of every weight the scheduler may prune through
    OptimizerMasks, pruned now or not (every bit set): the same keys in every phase, so that a
    state dict built as DCP's loading template names every mask a checkpoint holds, and copies
    (DCP loads into a template's tensors in place; these must not be the live masks)."""
    from ..optim.mask_state import mask_entry
    params = [p for g in scheduler.optimizer.param_groups for p in g["params"]]
    masks = scheduler.optimizer_masks.masks
    carried = {id(x.param) for x in scheduler.selected} - {id(m.weight) for m in scheduler.masked_linears}
    entries = {}
    for i, p in enumerate(params):
        if id(p) in carried:
            entry = mask_entry(p, masks.get(p))
            if entry is not None:
                entries[i] = entry.clone()
    return entries


def _check_same(scheduler, state: dict, saved: dict) -> None:
    """A ValueError naming the first key whose saved value differs from the scheduler's."""
    for key, value in saved.items():
        if value != getattr(scheduler, key):
            raise ValueError(f"state_dict has {key}={state.get(key, value)!r} but this scheduler has "
                             f"{getattr(scheduler, key)!r}")


def checked(scheduler, state) -> tuple[int, tuple[float, float], bool]:
    """(epoch, (sparse_lr_scale, redense_lr_scale), whether the groups hold the re-dense scale)
    of `state`, once every key is checked against `scheduler` (a ValueError naming the key)."""
    s = scheduler
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
    missing = [k for k in ("epoch", "lr_scaled", *PLAN_KEYS, "redense_lr_scale") if k not in state]
    if missing:
        raise ValueError(f"state_dict lacks {', '.join(missing)}: not a DSDScheduler state")
    # the settings saved always (the plan; ramp_epochs and ramp_every, None without a ramp; "unit"
    # before it existed was "epoch")
    _check_same(s, state, {**{k: state[k] for k in PLAN_KEYS}, "ramp_epochs": state.get("ramp_epochs"),
                           "ramp_every": state.get("ramp_every"), "unit": state.get("unit", "epoch")})
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= s.total_epochs:
        raise ValueError(f"state_dict has epoch={epoch!r}: expected an int in [0, {s.total_epochs}]")
    if not isinstance(state["lr_scaled"], bool):
        raise ValueError(f"state_dict has lr_scaled={state['lr_scaled']!r}: expected a bool")
    scales = [state.get(key, 1.0) for key in ("sparse_lr_scale", "redense_lr_scale")]
    for key, scale in zip(("sparse_lr_scale", "redense_lr_scale"), scales):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"state_dict has {key}={scale!r}: expected a positive finite number")
    # the settings saved since later versions: checked where present
    later = {k: state[k] for k in ("sparse_lr_scale", "redense_lr_scale", "scope") if k in state}
    if "block" in state:
        later["block"] = None if state["block"] is None else tuple(state["block"])
    _check_same(s, state, later)
    mine = _selected_names(s)
    if state.get("selected") is not None and mine is not None and list(state["selected"]) != mine:
        differ = sorted(set(state["selected"]) ^ set(mine))
        raise ValueError(f"state_dict was saved by a scheduler that selected other weights to prune (include, "
                         f"exclude or the sparsity patterns differ): {', '.join(differ[:4])}"
                         f"{' ...' if len(differ) > 4 else ''} in one and not the other")
    # before "lr_scales", the re-dense scale was written into the groups (saved with the optimizer)
    groups_hold = bool(state.get("groups_hold_redense_scale", False)) if "lr_scales" in state else state["lr_scaled"]
    return epoch, (float(scales[0]), float(scales[1])), groups_hold
