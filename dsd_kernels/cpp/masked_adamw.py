"""masked_adamw_ on the compiled kernels: csrc/cpu/masked_adamw.cpp on CPU tensors (torch's CPU
single-tensor/foreach bits), csrc/cuda/masked_adamw.cu on CUDA tensors (torch's CUDA foreach
bits, as the Triton kernel)."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)
from .._adamw_steps import advance_steps


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, *,
                  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, torch_fused=False) -> None:
    """torch's single-tensor/foreach AdamW arithmetic (the registry routes torch_fused=True to
    the composite, which calls torch's fused kernel). The step counts and bias corrections come
    from advance_steps, as torch computes them."""
    step_sizes, bias_correction2_sqrts = advance_steps(state_steps, lr, beta1, beta2)
    torch.ops.dsd_kernels_cpp.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs,
                                            max_exp_avg_sqs if amsgrad else [], mask_words, step_sizes,
                                            bias_correction2_sqrts, float(lr), float(beta1), float(beta2),
                                            float(eps), float(weight_decay), bool(amsgrad), bool(maximize))
