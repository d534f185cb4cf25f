"""DSD training's phase scheduler: dense -> sparse -> re-dense over any torch optimizer (the
train job built on it is dsd_kernels.app)."""
from .scheduler import PHASES, DSDScheduler

__all__ = ["DSDScheduler", "PHASES"]
