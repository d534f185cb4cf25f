"""Reference masked linear: F.linear on an explicitly masked weight (autograd does the rest)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_linear(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T + b with keep a bool tensor of weight's shape (True = kept)."""
    return F.linear(x, torch.where(keep, weight, torch.zeros_like(weight)), bias)
