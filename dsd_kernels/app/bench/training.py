"""Whole training steps (forward, backward, optimizer step) of a sparse phase against the dense
step of the same model in the same run, with the tools people use today beside ours.

Models, one thread each:
- "MLP stack": GPT-2-small-sized (4 blocks of Linear 768->3072, GELU, Linear 3072->768, a linear
  head to 10 classes; 18.9M parameters), batch 64 (unstructured) and 256 (block);
- "ResNet-18": the CIFAR-style ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64-512, 32x32 inputs,
  11.2M parameters; built here, no torchvision), batch 32;
- "GPT-2 small" where transformers is installed: GPT2LMHeadModel from GPT2Config()'s defaults
  (124M parameters; its attention and MLP layers are Conv1D), batch 2 x 128 tokens, the language
  modelling loss; the default scope prunes its Conv1D weights (not the embeddings).
Per model and optimizer (SGD momentum 0.9, AdamW):
- unstructured 50%: MaskedSGD / MaskedAdamW (with torch.nn.utils.prune's l1_unstructured and, on
  the MLP, torch.ao.pruning's WeightNormSparsifier with 1x1 blocks beside it: it does not take 4-D
  convolution weights); the torch optimizer with DSDScheduler's masks (OptimizerMasks: what any
  optimizer gets; its one pass, with its two passes beside it);
- block 64x64 at 50 / 75 / 90% of tiles (the MLP, GPT-2): DSDScheduler(block=(64, 64)) stepped into
  its sparse phase, the Linear and Conv1D layers computing through masked_linear.
Each case times its sparse step ("ours", or a peer) and the dense step ("dense step"), built from
the same weights, in alternating rounds; the ratio sparse / dense is the figure. Each case also
records the bytes of parameters, buffers, optimizer state and masks (a peer's mask buffers
count as buffers), and the same for the dense step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...optim import OptimizerMasks
from .timing import Case, single_threaded

WIDTH, HIDDEN, BLOCKS, CLASSES = 768, 3072, 4, 10
BLOCK_BATCH = 256
BLOCK_SPARSITIES = (0.5, 0.75, 0.9)


def mlp_stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(seed: int = 0) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs (the CIFAR stem: one 3x3 convolution, no pooling)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES))


@dataclass(frozen=True)
class _Model:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample's
    batch: int
    weight_norm_sparsifier: bool  # torch.ao.pruning's takes its weights
    block_batch: int = 0  # the block cases' batch (0: no block cases)
    tokens: int = 0  # a language model: sequences of this many token ids, the loss its own


GPT2_TOKENS = 128


def gpt2_small(seed: int = 0) -> nn.Module:
    """GPT-2 small (GPT2Config()'s defaults) from its config, never from the hub."""
    import transformers
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config())


def _has_transformers() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformers") is not None


MODELS = (_Model("MLP stack", mlp_stack, (WIDTH,), 64, True, block_batch=BLOCK_BATCH),
          _Model("ResNet-18", resnet18, (3, 32, 32), 32, False)) + (
          (_Model("GPT-2 small", gpt2_small, (), 2, True, block_batch=2, tokens=GPT2_TOKENS),)
          if _has_transformers() else ())


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


def _stepper(model: nn.Module, opt: torch.optim.Optimizer, spec: _Model, batch: int, device: str):
    gen = torch.Generator().manual_seed(1)
    if spec.tokens:
        ids = torch.randint(0, model.config.vocab_size, (batch, spec.tokens), generator=gen).to(device)

        def loss():
            return model(input_ids=ids, labels=ids).loss
    else:
        x = torch.randn(batch, *spec.input_shape, generator=gen).to(device)
        y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)

        def loss():
            return nn.functional.cross_entropy(model(x), y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    step()  # the state exists: the steady state is timed
    return step


def _dense(spec: _Model, name: str, batch: int, device: str):
    model = spec.build().to(device)
    opt = _optimizer(name, model.parameters(), masked=False)
    return single_threaded(_stepper(model, opt, spec, batch, device)), state_bytes(model, opt)


def _dsd_into_sparse(model, opt, sparsity: float, block=None):
    from ...dsd import DSDScheduler
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity=sparsity,
                       block=block)
    dsd.step()
    return dsd


def _pruned_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every weight the default scope prunes (what the peers are given)."""
    from ...scope import select
    chosen = {id(s.param) for s in select(model, 0.5)}
    return [(m, local) for m in model.modules() for local, p in m.named_parameters(recurse=False) if id(p) in chosen]


def _torch_prune(spec: _Model, name: str, device: str):
    from torch.nn.utils import prune
    model = spec.build().to(device)
    for module, local in _pruned_weights(model):
        prune.l1_unstructured(module, local, amount=0.5)
    opt = _optimizer(name, model.parameters(), masked=False)
    return single_threaded(_stepper(model, opt, spec, spec.batch, device)), state_bytes(model, opt)


def _weight_norm_sparsifier(spec: _Model, name: str, device: str):
    from torch.ao.pruning import WeightNormSparsifier
    model = spec.build().to(device)
    names = {id(m): n for n, m in model.named_modules()}
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{names[id(m)]}.{local}"} for m, local in _pruned_weights(model)])
    sparsifier.step()
    opt = _optimizer(name, model.parameters(), masked=False)
    return single_threaded(_stepper(model, opt, spec, spec.batch, device)), state_bytes(model, opt)


def _batch(spec: _Model, batch: int) -> str:
    return f"{batch} x {spec.tokens} tokens" if spec.tokens else str(batch)


PRUNE = "torch.nn.utils.prune (l1_unstructured)"
SPARSIFIER = "torch.ao.pruning WeightNormSparsifier"
TWO_PASSES = "OptimizerMasks two passes (elementwise=False)"


def _unstructured_cases(spec: _Model, name: str, label: str, device: str):
    masked = "MaskedSGD" if name == "sgd" else "MaskedAdamW"
    dense_step, dense_bytes = _dense(spec, name, spec.batch, device)
    model = spec.build().to(device)
    opt = _optimizer(name, model.parameters(), masked=True)
    opt.prune(0.5, model=model)
    ours = _stepper(model, opt, spec, spec.batch, device)
    peers, peer_bytes = {"dense step": dense_step}, {"dense step": dense_bytes}
    peers[PRUNE], peer_bytes[PRUNE] = _torch_prune(spec, name, device)
    if spec.weight_norm_sparsifier:
        peers[SPARSIFIER], peer_bytes[SPARSIFIER] = _weight_norm_sparsifier(spec, name, device)
    yield Case("training step", f"{spec.name}, {label}: {masked}, 50% unstructured, batch {_batch(spec, spec.batch)}, one thread",
               0, ours=single_threaded(ours), baselines=peers,
               notes={"state_bytes": {"ours": state_bytes(model, opt, opt.masks), **peer_bytes}})
    del model, opt, ours, peers

    model = spec.build().to(device)
    opt = _optimizer(name, model.parameters(), masked=False)
    dsd = _dsd_into_sparse(model, opt, 0.5)
    ours = _stepper(model, opt, spec, spec.batch, device)
    two_pass_model = spec.build().to(device)
    two_pass_opt = _optimizer(name, two_pass_model.parameters(), masked=False)
    OptimizerMasks(two_pass_opt, elementwise=False).set_masks(
        {q: dsd.masks[p] for p, q in zip(model.parameters(), two_pass_model.parameters()) if p in dsd.masks})
    two_pass = single_threaded(_stepper(two_pass_model, two_pass_opt, spec, spec.batch, device))
    yield Case("training step", f"{spec.name}, {label} + DSDScheduler masks (OptimizerMasks: one pass), 50% "
                                f"unstructured, batch {_batch(spec, spec.batch)}, one thread", 0, ours=single_threaded(ours),
               baselines={"dense step": dense_step, TWO_PASSES: two_pass},
               notes={"state_bytes": {"ours": state_bytes(model, opt, dsd.masks), "dense step": dense_bytes}})
    dsd.close()


def _block_cases(spec: _Model, name: str, device: str):
    masked = "MaskedSGD" if name == "sgd" else "MaskedAdamW"
    dense_step, dense_bytes = _dense(spec, name, spec.block_batch, device)
    for sparsity in BLOCK_SPARSITIES:
        model = spec.build().to(device)
        opt = _optimizer(name, model.parameters(), masked=True)
        dsd = _dsd_into_sparse(model, opt, sparsity, block=(64, 64))
        ours = _stepper(model, opt, spec, spec.block_batch, device)
        yield Case("training step", f"{spec.name}, {masked} + DSDScheduler(block=(64, 64)), {sparsity:.0%} of "
                                    f"tiles, batch {_batch(spec, spec.block_batch)}, one thread", 0, ours=single_threaded(ours),
                   baselines={"dense step": dense_step},
                   notes={"state_bytes": {"ours": state_bytes(model, opt, dsd.masks), "dense step": dense_bytes}})
        dsd.close()
        del model, opt, dsd, ours


def training_cases(device: str):
    """The cases one at a time (a generator: each case's models are freed before the next's)."""
    for spec in MODELS:
        for name, label in (("sgd", "SGD(momentum=0.9)"), ("adamw", "AdamW")):
            yield from _unstructured_cases(spec, name, label, device)
            if spec.block_batch:
                yield from _block_cases(spec, name, device)


def case_outline() -> list[tuple[str, list[str]]]:
    """(a short label, the timed callables' names) of every case, in training_cases' order,
    without building any model (benchmarks/bench_training.py parametrises over it)."""
    outline = []
    for spec in MODELS:
        for name in ("sgd", "adamw"):
            masked = "MaskedSGD" if name == "sgd" else "MaskedAdamW"
            outline.append((f"{spec.name} {masked}", ["ours", "dense step", PRUNE]
                            + ([SPARSIFIER] if spec.weight_norm_sparsifier else [])))
            outline.append((f"{spec.name} {'SGD' if name == 'sgd' else 'AdamW'} + OptimizerMasks",
                            ["ours", "dense step", TWO_PASSES]))
            if spec.block_batch:
                outline += [(f"{spec.name} {masked} block 64x64 {s:.0%}", ["ours", "dense step"])
                            for s in BLOCK_SPARSITIES]
    return outline
