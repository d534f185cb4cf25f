"""Optimizers that keep pruned weights (and their momentum) exactly at zero."""
from .masked_sgd import MaskedSGD, masked_sgd

__all__ = ["MaskedSGD", "masked_sgd"]
