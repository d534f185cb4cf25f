"""Lightning's FSDP2 strategy (ModelParallelStrategy) on 2 CPU processes with the DSD callback:
run as a script by tests/test_integrations_lightning.py (`python -m tests._helpers.lightning_fsdp
OUT`); Lightning starts rank 1 itself. Each rank saves, per epoch, the global count of pruned
weights and the callback's logged pruned fraction."""
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from dsd_kernels.integrations.lightning import DSDCallback

from .lightning_dsd import TinyNet, loader


class ShardedNet(TinyNet):
    def configure_model(self):
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class Record(pl.Callback):
    def __init__(self, dsd):
        self.dsd, self.pruned, self.logged = dsd, [], []

    def on_train_epoch_end(self, trainer, pl_module):
        masks = self.dsd.scheduler.masks
        count = torch.tensor([sum(m.numel - m.count() for m in masks.values())])
        dist.all_reduce(count)
        self.pruned.append(int(count))
        self.logged.append(self.dsd.scheduler.pruned_fraction())


if __name__ == "__main__":
    from lightning.pytorch.strategies import ModelParallelStrategy

    out = sys.argv[1]
    torch.manual_seed(0)
    dsd = DSDCallback(0.5, dense_epochs=2, sparse_epochs=2, redense_epochs=1)
    record = Record(dsd)
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", devices=2, callbacks=[dsd, record],
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(ShardedNet(), loader())
    torch.save({"pruned": record.pruned, "logged": record.logged}, f"{out}/rank{trainer.global_rank}.pt")
