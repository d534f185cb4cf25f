"""DSD training's phase scheduler: dense -> sparse -> re-dense over any torch optimizer (the
train job built on it is dsd_kernels.app)."""
from .plan import PHASES
from .scheduler import DSDScheduler

__all__ = ["DSDScheduler", "PHASES"]
