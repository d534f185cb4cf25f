"""masked_sgd_ on the compiled kernels: csrc/cpu/masked_sgd.cpp on CPU tensors, csrc/cuda/masked_sgd.cu
on CUDA tensors."""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (registers torch.ops.dsd_kernels_cpp)


def masked_sgd_(params, grads, momentum_buffers, mask_words, first_step, *, lr, momentum,
                dampening, weight_decay, nesterov, maximize, torch_fused=False) -> None:
    """torch's single-tensor/foreach SGD arithmetic (the registry routes torch_fused=True on CPU
    to the composite, which calls torch's fused kernel); on CUDA one arithmetic for both."""
    torch.ops.dsd_kernels_cpp.masked_sgd_(params, grads, momentum_buffers, mask_words,
                                          first_step, float(lr), float(momentum), float(dampening),
                                          float(weight_decay), bool(nesterov), bool(maximize))
