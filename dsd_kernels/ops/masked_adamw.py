"""One fused masked AdamW step over many parameters: `masked_adamw_` (custom op
`dsd_kernels::masked_adamw_`)."""
# No `from __future__ import annotations` here: torch.library.custom_op reads the prototypes'
# annotations to build the schemas, and torch 2.4 accepts only evaluated typing forms.
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backend
from .._floatbits import KEY_SPECS
from .._dtensor import local_tensor
from ..masks import as_mask, packed_shape
from ._common import any_dtensor, as_tensor_list, check_kernel_tensors, check_writable, dtypes_of, kernel_layout

__all__ = ["masked_adamw_", "check_adamw_hyperparameters"]


def check_adamw_hyperparameters(lr, beta1, beta2, eps, weight_decay) -> None:
    """The op's own checks of its float hyper-parameters (tensors are for AdamW's own step)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, Tensor) or not value >= 0.0:
            raise ValueError(f"Invalid {name} value: {value} (a non-negative float)")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, Tensor) or not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid {name} value: {value} (a float in [0, 1))")


def _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words,
                      amsgrad, *, real) -> None:
    """The checks of the masked_adamw_ op's real and fake implementations."""
    n = len(params)
    torch._check_value(len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == len(mask_words) == n,
                       lambda: f"masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, state_steps and "
                               f"mask_words need {n} entries each")
    torch._check_value(len(max_exp_avg_sqs) == (n if amsgrad else len(max_exp_avg_sqs)),
                       lambda: f"masked_adamw_: amsgrad needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    # one pass of plain comparisons first (an optimizer step checks every parameter, every step);
    # the detailed loop below runs only to name what is wrong
    state_lists = (grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
    if all(p.dtype in KEY_SPECS
           and all(t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
                   for t in (s[i] for s in state_lists))
           and (w is None or (w.dtype == torch.int32 and tuple(w.shape) == packed_shape(p.shape)))
           for i, (p, w) in enumerate(zip(params, mask_words))):
        _check_adamw_layouts(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, real)
        return
    for i, p in enumerate(params):
        torch._check_type(p.dtype in KEY_SPECS, lambda: f"params[{i}] has dtype {p.dtype}; AdamW needs "
                                                        f"floating parameters")
        state = [("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        if amsgrad:
            state.append(("max_exp_avg_sqs", max_exp_avg_sqs[i]))
        for name, t in state:
            if not (t.shape == p.shape and t.dtype == p.dtype and t.device == p.device):
                torch._check_value(False, lambda: f"{name}[{i}] ({tuple(t.shape)}, {t.dtype}, {t.device}) "
                                                  f"does not match params[{i}] ({tuple(p.shape)}, {p.dtype}, "
                                                  f"{p.device})")
        words = mask_words[i]
        if words is not None and not (words.dtype == torch.int32 and tuple(words.shape) == packed_shape(p.shape)):
            torch._check_value(False, lambda: f"mask_words[{i}] ({tuple(words.shape)}, {words.dtype}) does not "
                                              f"fit params[{i}]: expected int32 {packed_shape(p.shape)}")
    _check_adamw_layouts(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, real)


def _check_adamw_layouts(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, real):
    check_kernel_tensors("masked_adamw_", (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                                           ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs),
                                           ("state_steps", state_steps), ("mask_words", mask_words)),
                         ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"), real=real)


@torch.library.custom_op("dsd_kernels::masked_adamw_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def _masked_adamw_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                     exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor],
                     mask_words: List[Optional[Tensor]], lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, amsgrad: bool, maximize: bool, torch_fused: bool = False) -> None:
    _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad,
                      real=True)
    if not params:
        return
    impl = _backend.implementation("masked_adamw", params[0].device, dtypes_of(params),
                                   "fused" if torch_fused else "foreach")
    impl.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words,
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize, torch_fused=torch_fused)


@_masked_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, torch_fused=False):
    _check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad,
                      real=False)
    return None


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, *, lr,
                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                  torch_fused=False) -> None:
    """One fused masked AdamW step over a list of parameters, in place (names as torch's
    functional `adamw`).

    torch.optim.AdamW's arithmetic exactly: fp32/fp64 results are bit-identical on CPU to
    torch.optim.AdamW's single-tensor and foreach steps (with torch_fused=True, to its fused
    kernel) on the kept weights; the pruned weights, exp_avg, exp_avg_sq (and max_exp_avg_sq)
    are exactly +0 after the step, whatever the gradient held there. state_steps: one scalar
    tensor per parameter (as torch keeps them), incremented here. masks: None (all dense), or
    one per parameter: a Mask, a bool or 0/1 tensor (True/1 = kept), or None (dense).
    Parameters may be non-contiguous (channels_last steps in its memory order) or complex
    (stepped through the real view). On CPU the C++ kernel does it in one pass over memory.
    """
    params = as_tensor_list(params, "params")
    grads = as_tensor_list(grads, "grads")
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
    max_exp_avg_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    state_steps = list(state_steps)
    masks = [None] * len(params) if masks is None else list(masks)
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == len(masks) == n):
        raise ValueError(f"params, grads, exp_avgs, exp_avg_sqs, state_steps and masks must have equal "
                         f"lengths, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, "
                         f"{len(state_steps)}, {len(masks)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"amsgrad=True needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    check_adamw_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    if not params:
        return
    if any_dtensor(params):  # sharded params (FSDP2): each rank steps its local shards, masks local too
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
            [local_tensor(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs))
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"params[{i}] has dtype {p.dtype}; AdamW needs floating or complex parameters")
        by_device.setdefault(p.device, []).append(i)
    for device, index in by_device.items():
        stepped, write_back, words = [], [], []
        for i in index:
            p = params[i].detach()
            mask = None if masks[i] is None else as_mask(masks[i], p, f"masks[{i}]")
            g = grads[i]
            if g.layout != torch.strided:
                raise ValueError(f"grads[{i}]: AdamW does not support sparse gradients")
            state = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
            check_writable([(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in
                                                     zip(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), state)])
            p, mask, (g, *state) = kernel_layout(p, mask, [g] + [t.detach() for t in state], write_back,
                                                   read_only=1)
            stepped.append((p, g, state))
            words.append(None if mask is None else mask.packed)
        torch.ops.dsd_kernels.masked_adamw_(
            [p for p, _, _ in stepped], [g for _, g, _ in stepped], [s[0] for _, _, s in stepped],
            [s[1] for _, _, s in stepped], [s[2] for _, _, s in stepped] if amsgrad else [],
            [state_steps[i] for i in index], words, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(amsgrad), bool(maximize), bool(torch_fused))
        for target, result in write_back:
            target.copy_(result)

