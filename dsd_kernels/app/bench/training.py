"""Whole training steps (forward, backward, optimizer step) of a sparse phase against the dense
step of the same model in the same run, with the tools people use today beside ours.

The model: a GPT-2-small-sized MLP stack (4 blocks of Linear 768->3072, GELU, Linear 3072->768,
a linear head to 10 classes), one thread. Per optimizer (SGD momentum 0.9, AdamW):
- unstructured 50% (batch 64): MaskedSGD / MaskedAdamW; the torch optimizer with DSDScheduler's
  masks (OptimizerMasks: what any optimizer gets; its one pass, with its two passes beside it); and
  as peers torch.nn.utils.prune
  (l1_unstructured) and torch.ao.pruning's WeightNormSparsifier (1x1 blocks);
- block 64x64 at 50 / 75 / 90% of tiles (batch 256): DSDScheduler(block=(64, 64)) stepped into
  its sparse phase, the Linear layers computing through masked_linear.
Each case times its sparse step ("ours", or a peer) and the dense step ("dense step"), built from
the same weights, in alternating rounds; the ratio sparse / dense is the figure. Each case also
records the bytes of parameters, buffers, optimizer state and masks (a peer's mask buffers
count as buffers), and the same for the dense step.
"""
from __future__ import annotations

import torch
from torch import nn

from ...optim import OptimizerMasks
from .timing import Case

WIDTH, HIDDEN, BLOCKS, CLASSES = 768, 3072, 4, 10
UNSTRUCTURED_BATCH, BLOCK_BATCH = 64, 256
BLOCK_SPARSITIES = (0.5, 0.75, 0.9)


def mlp_stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def _optimizer(name: str, params, masked: bool):
    """SGD with momentum or AdamW: torch's, or ours (MaskedSGD, MaskedAdamW) with masked=True."""
    from ...optim import MaskedAdamW, MaskedSGD
    if name == "sgd":
        return (MaskedSGD if masked else torch.optim.SGD)(params, lr=1e-3, momentum=0.9)
    return (MaskedAdamW if masked else torch.optim.AdamW)(params, lr=1e-4)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, masks=None) -> int:
    """Bytes of the model's parameters and buffers, the optimizer's state tensors and `masks`."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for state in opt.state.values():
        tensors.update({id(v): v for v in state.values() if isinstance(v, torch.Tensor)})
    for m in (masks or {}).values():
        tensors[id(m.packed)] = m.packed
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _stepper(model: nn.Module, opt: torch.optim.Optimizer, batch: int, device: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, WIDTH, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    step()  # the state exists: the steady state is timed
    return step


def _single_threaded(fn):
    def call():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return call


def _dense(name: str, batch: int, device: str):
    model = mlp_stack().to(device)
    opt = _optimizer(name, model.parameters(), masked=False)
    return _stepper(model, opt, batch, device), state_bytes(model, opt)


def _dsd_into_sparse(model, opt, sparsity: float, block=None):
    from ...dsd import DSDScheduler
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=sparsity,
                       block=block)
    dsd.step()
    return dsd


def _torch_prune(name: str, batch: int, device: str):
    from torch.nn.utils import prune
    model = mlp_stack().to(device)
    for module in model:
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, "weight", amount=0.5)
    opt = _optimizer(name, model.parameters(), masked=False)
    return _stepper(model, opt, batch, device), state_bytes(model, opt)


def _weight_norm_sparsifier(name: str, batch: int, device: str):
    from torch.ao.pruning import WeightNormSparsifier
    model = mlp_stack().to(device)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{i}.weight"} for i, m in enumerate(model)
                               if isinstance(m, nn.Linear)])
    sparsifier.step()
    opt = _optimizer(name, model.parameters(), masked=False)
    return _stepper(model, opt, batch, device), state_bytes(model, opt)


def training_cases(device: str):
    """The cases one at a time (a generator: each case's models are freed before the next's)."""
    for name, label in (("sgd", "SGD(momentum=0.9)"), ("adamw", "AdamW")):
        masked = "MaskedSGD" if name == "sgd" else "MaskedAdamW"
        dense_step, dense_bytes = _dense(name, UNSTRUCTURED_BATCH, device)
        model = mlp_stack().to(device)
        opt = _optimizer(name, model.parameters(), masked=True)
        opt.prune(0.5, model=model)
        ours = _stepper(model, opt, UNSTRUCTURED_BATCH, device)
        peers = {}
        prune_step, prune_bytes = _torch_prune(name, UNSTRUCTURED_BATCH, device)
        sparsifier_step, sparsifier_bytes = _weight_norm_sparsifier(name, UNSTRUCTURED_BATCH, device)
        peers = {"dense step": _single_threaded(dense_step),
                 "torch.nn.utils.prune (l1_unstructured)": _single_threaded(prune_step),
                 "torch.ao.pruning WeightNormSparsifier": _single_threaded(sparsifier_step)}
        yield Case("training step", f"MLP stack, {label}: {masked}, 50% unstructured, batch {UNSTRUCTURED_BATCH}, "
                                    f"one thread", 0, ours=_single_threaded(ours), baselines=peers,
                   notes={"state_bytes": {"ours": state_bytes(model, opt, opt.masks), "dense step": dense_bytes,
                                          "torch.nn.utils.prune (l1_unstructured)": prune_bytes,
                                          "torch.ao.pruning WeightNormSparsifier": sparsifier_bytes}})
        del model, opt, ours, peers, prune_step, sparsifier_step

        model = mlp_stack().to(device)
        opt = _optimizer(name, model.parameters(), masked=False)
        dsd = _dsd_into_sparse(model, opt, 0.5)
        ours = _stepper(model, opt, UNSTRUCTURED_BATCH, device)
        two_pass_model = mlp_stack().to(device)
        two_pass_opt = _optimizer(name, two_pass_model.parameters(), masked=False)
        OptimizerMasks(two_pass_opt, elementwise=False).set_masks(
            {q: dsd.masks[p] for p, q in zip(model.parameters(), two_pass_model.parameters()) if p in dsd.masks})
        two_pass = _stepper(two_pass_model, two_pass_opt, UNSTRUCTURED_BATCH, device)
        yield Case("training step", f"MLP stack, {label} + DSDScheduler masks (OptimizerMasks: one pass), 50% "
                                    f"unstructured, batch {UNSTRUCTURED_BATCH}, one thread", 0,
                   ours=_single_threaded(ours),
                   baselines={"dense step": _single_threaded(dense_step),
                              "OptimizerMasks two passes (elementwise=False)": _single_threaded(two_pass)},
                   notes={"state_bytes": {"ours": state_bytes(model, opt, dsd.masks), "dense step": dense_bytes}})
        dsd.close()
        del model, opt, dsd, ours, dense_step, two_pass, two_pass_model, two_pass_opt

        dense_step, dense_bytes = _dense(name, BLOCK_BATCH, device)
        for sparsity in BLOCK_SPARSITIES:
            model = mlp_stack().to(device)
            opt = _optimizer(name, model.parameters(), masked=True)
            dsd = _dsd_into_sparse(model, opt, sparsity, block=(64, 64))
            ours = _stepper(model, opt, BLOCK_BATCH, device)
            yield Case("training step", f"MLP stack, {masked} + DSDScheduler(block=(64, 64)), {sparsity:.0%} of "
                                        f"tiles, batch {BLOCK_BATCH}, one thread", 0, ours=_single_threaded(ours),
                       baselines={"dense step": _single_threaded(dense_step)},
                       notes={"state_bytes": {"ours": state_bytes(model, opt, dsd.masks), "dense step": dense_bytes}})
            dsd.close()
            del model, opt, dsd, ours
        del dense_step
