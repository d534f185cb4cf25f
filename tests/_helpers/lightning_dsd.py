"""A tiny LightningModule and data for the Lightning DSDCallback tests (also run as a script by
the DDP test: `python -m tests._helpers.lightning_dsd OUT`, which Lightning's ddp launcher starts again
for rank 1)."""
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, BATCH = 64, 8


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle fixed by the epoch number (Lightning calls set_epoch), so a resumed run sees
    the batches an uninterrupted one sees."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())


def loader(samples: int = SAMPLES, batch: int = BATCH) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 16, generator=g), torch.randint(0, 4, (samples,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, sampler=EpochShuffle(samples))


class TinyNet(pl.LightningModule):
    """Two Linear layers and a LayerNorm; records the LR of every step and, at every gradient
    clipping, whether the pruned gradient entries were already 0."""

    def __init__(self, optimizer: str = "adamw", schedule: str = "lambda-step"):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 4))
        self.optimizer_name, self.schedule = optimizer, schedule
        self.lrs, self.clipped_grads_masked = [], []
        self.dsd = None  # set by tests that check gradients at clipping

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.dsd is not None and self.dsd.scheduler.masks:
            self.clipped_grads_masked.append(all(bool((p.grad[~m.to_bool()] == 0).all())
                                                 for p, m in self.dsd.scheduler.masks.items()))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        if self.optimizer_name == "masked_adamw":
            from dsd_kernels.optim import MaskedAdamW
            optimizer = MaskedAdamW(self.parameters(), lr=1e-2)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if self.schedule == "lambda-step":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + 0.05 * s))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


if __name__ == "__main__":  # the DDP test: 2 CPU processes, gloo
    from dsd_kernels.integrations.lightning import DSDCallback

    out = sys.argv[1]
    torch.manual_seed(0)
    model = TinyNet()
    dsd = DSDCallback(0.5, dense_epochs=2, sparse_epochs=2, redense_epochs=1)

    class Record(pl.Callback):
        """Each epoch's weights and masks, after the DSD callback acted on that epoch's end."""

        def __init__(self):
            self.epochs = []

        def on_train_epoch_end(self, trainer, pl_module):
            masks = dsd.scheduler.masks
            self.epochs.append(([p.detach().clone() for p in pl_module.parameters()],
                                {name: masks[p].to_bool() for name, p in pl_module.named_parameters() if p in masks}))

    record = Record()
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", devices=2, strategy="ddp", callbacks=[dsd, record],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, loader())
    torch.save(record.epochs, f"{out}/rank{trainer.global_rank}.pt")
