"""DTensor (FSDP2's sharded parameters) seen from the single-process code: is it one, and its
local shard. The one place outside distributed.py that knows DTensor, so that ops, optim and
distributed share one spelling and torch.distributed is imported only where it exists."""
from __future__ import annotations

import torch

if torch.distributed.is_available():
    try:  # public since torch 2.5
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import DTensor, Replicate, Shard
else:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = Shard = None

__all__ = ["DTensor", "Replicate", "Shard", "full_tensor", "is_dtensor", "local_tensor", "full_like",
           "local_part"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it), or t itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or t itself."""
    return t.to_local() if is_dtensor(t) else t


def full_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like DTensor `like`'s local shard (a mask, a score), gathered whole in the
    global shape (a collective: every rank calls it); `local` itself when `like` is no DTensor."""
    if not is_dtensor(like):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole` (the same on every rank, in DTensor `like`'s global shape) as
    `like` is sharded; `whole` itself when `like` is no DTensor."""
    if not is_dtensor(like):
        return whole
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import distribute_tensor
    return distribute_tensor(whole, like.device_mesh, like.placements).to_local()
