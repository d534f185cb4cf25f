"""DSD training's phase scheduler: dense -> sparse -> re-dense over any torch optimizer (the
train job built on it is dsd_kernels.app); and dynamic sparse training (RigL, SET) on the same
masks."""
from .plan import PHASES
from .rigl import RigLScheduler
from .scheduler import DSDScheduler

__all__ = ["DSDScheduler", "RigLScheduler", "PHASES"]
