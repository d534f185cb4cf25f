"""The public ops, each a torch.library custom op `dsd_kernels::*`, one module per op (named as
the backends' modules): the one layer that chooses a backend (see _backend.py). Everything
above it (optim/, nn/, dsd/, integrations/) calls these functions, never a kernel. Each op
checks its arguments in its Python front end and again in its real and fake implementations,
so every backend sees well-formed input and a direct `torch.ops.dsd_kernels.*` call fails
with the same clear error.
"""
from .apply_masks import apply_masks_
from .magnitude_select import magnitude_masks, magnitude_thresholds
from .mask_update import mask_update
from .masked_adamw import masked_adamw_
from .masked_linear import masked_linear
from .masked_sgd import masked_sgd_

__all__ = ["magnitude_thresholds", "magnitude_masks", "masked_sgd_", "masked_adamw_", "apply_masks_",
           "masked_linear", "mask_update"]
