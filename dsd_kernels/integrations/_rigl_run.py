"""What the trainer callbacks' RigL and SET share (lightning.RigLCallback,
transformers.RigLCallback): RigLScheduler's settings kept until the trainer hands over its
optimizer and model, and the scheduler built over them (the first fit's closed first on a second
fit)."""
from __future__ import annotations

from ..dsd.rigl import RigLScheduler
from ._dsd_run import unwrap_optimizer

# end_step=None: the mask updates stop after this fraction of the run's optimizer steps (RigL's 3/4)
END_FRACTION = 0.75


class RigLRun:
    """RigLScheduler's arguments, with end_step=None meaning END_FRACTION of the run's steps."""

    def __init__(self, sparsity, *, update_every: int = 100, end_step: int | None = None, drop_fraction: float = 0.3,
                 growth: str = "gradient", distribution: str = "uniform", seed: int = 0, include=None, exclude=None,
                 block=None):
        self.sparsity, self.end_step = sparsity, end_step
        self.options = dict(update_every=update_every, drop_fraction=drop_fraction, growth=growth,
                            distribution=distribution, seed=seed, include=include, exclude=exclude, block=block)
        self.scheduler: RigLScheduler | None = None

    def start(self, optimizer, model, total_steps: int, state: dict | None) -> None:
        """Build the scheduler over the trainer's optimizer and model (`total_steps`: the run's
        optimizer steps, for end_step=None; `state`: a saved state_dict to resume from)."""
        end_step = self.end_step if self.end_step is not None else max(1, int(END_FRACTION * total_steps))
        if self.scheduler is not None:  # a second fit: the first one's hooks go
            self.scheduler.close()
        self.scheduler = RigLScheduler(unwrap_optimizer(optimizer), model=model, sparsity=self.sparsity,
                                       end_step=end_step, state=state, **self.options)
