"""What a DSDScheduler attaches to its optimizer and model, and who may attach: one scheduler per
optimizer (two would multiply their learning-rate scales and apply both mask sets), and the
release of a scheduler's hooks when it is closed or collected (a scheduler that is gone masks
nothing)."""
from __future__ import annotations

import gc
import weakref

from . import tile_layers

# optimizer -> weakref to the DSDScheduler on it: one at a time (two would multiply their rate
# scales and apply both mask sets)
_SCHEDULER_OF: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def claim(optimizer, scheduler) -> None:
    """Register `scheduler` as the optimizer's one DSDScheduler, or raise naming the one it has."""
    held = _SCHEDULER_OF.get(optimizer)
    current = held() if held is not None else None
    if current is not None:
        gc.collect()  # one held only by reference cycles is gone: collected before refusing
        current = held()
    if current is not None:
        raise ValueError(f"{type(optimizer).__name__} already has a {type(current).__name__} ({current!r}); call its "
                         f"close() before building another scheduler on the same optimizer (two would multiply their learning-"
                         f"rate scales and apply both sets of masks)")
    _SCHEDULER_OF[optimizer] = weakref.ref(scheduler)


def release_hooks(rate_scale, optimizer_masks, tile_linears) -> None:
    """What a scheduler leaves on its optimizer and layers, removed (close(), or the scheduler
    collected)."""
    rate_scale.remove()
    if optimizer_masks is not None:
        optimizer_masks.remove()
    tile_layers.remove(tile_linears)


def release_claim(optimizer, scheduler) -> None:
    """The optimizer is free for another scheduler (after `scheduler` is closed)."""
    held = _SCHEDULER_OF.get(optimizer)
    if held is not None and held() is scheduler:
        del _SCHEDULER_OF[optimizer]
