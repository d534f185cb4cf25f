"""masked_adamw_ on the compiled kernels: csrc/cpu/masked_adamw.cpp on CPU tensors (torch's CPU
single-tensor/foreach bits, or with torch_fused=True its fused kernel's), csrc/cuda/masked_adamw.cu
on CUDA tensors (torch's CUDA foreach bits, as the Triton kernel)."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from .._adamw_steps import advance_fused_steps, advance_steps, fused_layout


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, torch_fused=False, static_key=None) -> None:
    """torch's single-tensor/foreach AdamW arithmetic, or with torch_fused=True (CPU) that of its
    fused kernel. The step counts and bias corrections come from advance_steps /
    advance_fused_steps, as torch computes them."""
    scalars = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize))
    layout = fused_layout(params[0].dtype) if torch_fused and not params[0].is_cuda else None
    if torch_fused and (layout is None or len({p.dtype for p in params}) > 1):
        from ..torch.masked_adamw import masked_adamw_ as torch_step  # torch's own fused kernel
        torch_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr=lr,
                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                   maximize=maximize, torch_fused=True)
        return
    if torch_fused:
        step_sizes, bias_correction2_sqrts = advance_fused_steps(state_steps, lr, beta1, beta2)
        torch.ops.dsd_kernels_cpp.masked_adamw_fused_(params, grads, exp_avgs, exp_avg_sqs,
                                                      max_exp_avg_sqs if amsgrad else [], mask_words, step_sizes,
                                                      bias_correction2_sqrts, *scalars, *layout)
        return
    step_sizes, bias_correction2_sqrts = advance_steps(state_steps, lr, beta1, beta2)
    torch.ops.dsd_kernels_cpp.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs,
                                            max_exp_avg_sqs if amsgrad else [], mask_words, step_sizes,
                                            bias_correction2_sqrts, *scalars)
