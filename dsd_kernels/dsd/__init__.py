"""DSD training: the phase scheduler, the training job behind `dsd-kernels train`, reports."""
from .scheduler import PHASES, DSDScheduler

__all__ = ["DSDScheduler", "PHASES"]
