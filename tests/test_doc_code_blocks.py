"""Every code block of README.md and docs/ runs, so none can drift from the code again.

Python blocks run page by page, in order, in one fresh process per page (the blocks of a page
build on each other as a reader's session would), in a temporary folder, after a prelude that
defines the names the snippets take as given: a tiny `model` whose module names match the
snippets' patterns (attn, mlp, lm_head), a `loader`, `loss_fn`, `train_one_epoch`, the op
arguments, and on the integrations pages a LightningModule, a tiny GPT-2 and their data. A block
preceded by `<!-- requires: cuda -->` runs only where CUDA is present (elsewhere it is compiled
and reported as skipped). Shell blocks: every `dsd-kernels ...` command is parsed by the real
command line (its options must exist), the rest is not run (installs, pytest, the GPU script)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- requires: (\w+) -->\s*\n)?^```(python|bash)\n(.*?)^```", re.S | re.M)

PRELUDE = r'''
import os, torch, dsd_kernels as dk
from torch import nn
from dsd_kernels.dsd import DSDScheduler
from dsd_kernels.optim import MaskedAdamW, MaskedSGD
torch.manual_seed(0)

class Tiny(nn.Module):
    """The snippets' `model`: module names their patterns pick (attn, mlp, lm_head), rows of 64."""
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.lm_head = nn.Linear(64, 8)
    def forward(self, x):
        return self.lm_head(self.mlp(torch.relu(self.attn(x))))

model = Tiny()
loader = [(torch.randn(16, 64), torch.randint(0, 8, (16,))) for _ in range(2)]
loss_fn = nn.functional.cross_entropy
def train_one_epoch(model, opt):
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
x, w, b = torch.randn(16, 64), torch.randn(32, 64), torch.zeros(32)
mask = dk.magnitude_masks(w, 0.5)[0]
params = [p.detach() for p in model.parameters() if p.dim() >= 2]  # the ops' lists: model's weights
grads = [torch.randn_like(p) for p in params]
momentum_buffers = [torch.zeros_like(p) for p in params]
exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
max_exp_avg_sqs = [torch.zeros_like(p) for p in params]
state_steps = [torch.tensor(0.0) for p in params]
tensors = [torch.randn_like(p) for p in params]
masks = dk.magnitude_masks(params, 0.5)
'''

# the integrations pages: a LightningModule and its loader, a tiny GPT-2 and its data, a one-rank
# gloo group for the FSDP2 snippet
INTEGRATIONS = r'''
import lightning.pytorch as L
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Tiny()
    def training_step(self, batch, batch_idx):
        x, y = batch
        return loss_fn(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

module = Module()
train_loader = DataLoader(TensorDataset(torch.randn(32, 64), torch.randint(0, 8, (32,))), batch_size=16)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (16, 16))]
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
dist.init_process_group("gloo", rank=0, world_size=1)
'''
PAGE_PRELUDES = {"docs/integrations.md": INTEGRATIONS, "docs/dynamic-sparsity.md": INTEGRATIONS}


def blocks(page: str, language: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, requirement) of each block of `language` on the page."""
    text = (ROOT / page).read_text()
    return [(text[:m.start(3)].count("\n") + 1, m.group(4), m.group(2)) for m in BLOCK.finditer(text)
            if m.group(3) == language]


def _runner(page: str, found: list) -> str:
    lines = [PRELUDE, PAGE_PRELUDES.get(page, ""), "import traceback, sys"]
    for line, code, requirement in found:
        if requirement == "cuda" and not torch.cuda.is_available():
            lines.append(f"compile({code!r}, {page + ':' + str(line)!r}, 'exec')  # requires cuda: compiled only")
            continue
        lines.append(f"try:\n    exec(compile({code!r}, {page + ':' + str(line)!r}, 'exec'))\n"
                     f"except Exception:\n    traceback.print_exc()\n"
                     f"    sys.exit('the block at {page}:{line} failed')")
    return "\n".join(lines)


PYTHON_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, tmp_path):
    found = blocks(page, "python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", _runner(page, found)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


CUDA_BLOCKS = [(p, line) for p in PYTHON_PAGES for line, _, requirement in blocks(p, "python") if requirement == "cuda"]


@pytest.mark.parametrize("page,line", CUDA_BLOCKS)
def test_cuda_blocks_ran(page, line):
    """The blocks that need CUDA: run by test_python_blocks_run where CUDA is present; here
    (without it) they were only compiled, which this reports."""
    if not torch.cuda.is_available():
        pytest.skip(f"{page}:{line} needs CUDA: compiled, not run, on this machine")


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "bash")])
def test_every_command_line_in_shell_blocks_parses(page):
    from dsd_kernels.app import cli
    parser = cli.build_parser()
    commands = []
    for _, code, _ in blocks(page, "bash"):
        for line in code.splitlines():
            for part in re.split(r"&&|;", line.split("  #")[0]):
                words = shlex.split(part.strip(), comments=True)
                if words and words[0] == "dsd-kernels":
                    commands.append(words[1:])
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{page}: `dsd-kernels {' '.join(argv)}` does not parse (exit {err.code})")
