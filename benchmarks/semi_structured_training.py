"""A 2:4 sparse phase on sparse tensor cores: whole training steps of the MLP stack (the training
bench's, dsd_kernels/app/bench/training.py) in bf16/fp16 on CUDA, after DSDScheduler(sparsity="2:4")
pruned it, each selected Linear multiplying through torch's semi-structured sparse weight (rebuilt
from the masked weight at every forward by torch._sparse_semi_structured_tile, as torchao's
training recipe does; the weight's gradient passes straight through and the scheduler's masks
keep the pruned weights 0), against the dense step of the same model in the same run. Run by
gpu_check.sh; not yet run on a GPU.

    python benchmarks/semi_structured_training.py [--out semi-structured-training.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

BATCH = 4096  # rows per step: the sparse tensor cores pay on large products


class _SemiStructuredWeight(torch.autograd.Function):
    """W (already 2:4 by its mask) -> torch's CUTLASS semi-structured tensor; gradient straight through."""

    @staticmethod
    def forward(ctx, weight):
        from torch.sparse import SparseSemiStructuredTensorCUTLASS
        packed, meta, packed_t, meta_t, bitmask = torch._sparse_semi_structured_tile(weight, algorithm="",
                                                                                     use_cutlass=True)
        return SparseSemiStructuredTensorCUTLASS(weight.shape, packed, meta, packed_t, meta_t, bitmask,
                                                 requires_grad=False)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _semi_structured_forward(module, x):
    return F.linear(x, _SemiStructuredWeight.apply(module.weight), module.bias)


def _stepper(model, opt, gen):
    from dsd_kernels.app.bench.training import CLASSES, WIDTH
    x = torch.randn(BATCH, WIDTH, generator=gen, device="cuda").to(next(model.parameters()).dtype)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    step()
    return step


def case(dtype) -> dict:
    import types

    from dsd_kernels.app.bench.training import mlp_stack
    from dsd_kernels.dsd import DSDScheduler
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense_model = mlp_stack().to("cuda", dtype)
    dense = _stepper(dense_model, torch.optim.AdamW(dense_model.parameters(), lr=1e-4), gen)
    model = mlp_stack().to("cuda", dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dsd = DSDScheduler(opt, model=model, dense_epochs=1, sparse_epochs=1, redense_epochs=1, sparsity="2:4")
    dsd.step()  # into the sparse phase: every selected weight 2:4
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight in dsd.masks]
    for m in layers:
        m.forward = types.MethodType(_semi_structured_forward, m)
    sparse = _stepper(model, opt, gen)
    times = {name: Timer("f(); torch.cuda.synchronize()", globals=dict(f=fn, torch=torch)).blocked_autorange(
        min_run_time=1.0).median for name, fn in (("dense", dense), ("2:4 sparse phase", sparse))}
    pruned_zero = all(bool(m.weight[~dsd.masks[m.weight].to_bool()].eq(0).all()) for m in layers)
    return {"dtype": str(dtype), "batch": BATCH, "layers_on_sparse_tensor_cores": len(layers),
            "dense_step_s": times["dense"], "sparse_step_s": times["2:4 sparse phase"],
            "time_vs_dense_step": times["2:4 sparse phase"] / times["dense"], "pruned_weights_stay_zero": pruned_zero}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA: torch's semi-structured sparse kernels run on NVIDIA GPUs (sm_80+)")
        return 0
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        try:
            row = case(dtype)
        except Exception as err:  # noqa: BLE001 - an unsupported torch/GPU is a result to record
            row = {"dtype": str(dtype), "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
