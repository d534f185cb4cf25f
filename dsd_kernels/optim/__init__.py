"""Optimizers that keep pruned weights (and their optimizer state) exactly at zero: MaskedSGD's
fused step, MaskedAdamW, or OptimizerMasks around any torch optimizer."""
from .masked_adamw import MaskedAdamW
from .masked_sgd import MaskedSGD, masked_sgd
from .masking import OptimizerMasks

__all__ = ["MaskedSGD", "masked_sgd", "MaskedAdamW", "OptimizerMasks"]
