"""AdamW's per-tensor step scalars as torch's non-capturable single-tensor/foreach step computes
them, shared by the compiled backends (C++ and Triton) of masked_adamw_."""
from __future__ import annotations

import torch


def advance_steps(state_steps, lr: float, beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """Increment the step counts (as torch does) and return, per tensor, lr / bias_correction1
    and sqrt(bias_correction2), Python floats from the incremented counts as torch takes them."""
    torch._foreach_add_(state_steps, 1)
    if len({t.dtype for t in state_steps}) == 1:
        steps = torch.stack(state_steps).tolist()  # one read for all (each .item() costs a call)
    else:
        steps = [t.item() for t in state_steps]
    step_sizes = [lr / (1 - beta1 ** step) for step in steps]
    bias_correction2_sqrts = [(1 - beta2 ** step) ** 0.5 for step in steps]
    return step_sizes, bias_correction2_sqrts
