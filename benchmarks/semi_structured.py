"""2:4 inference on sparse tensor cores: a 2:4-pruned fp16/bf16 Linear exported by
dk.nn.to_semi_structured against the same dense F.linear, on CUDA (run by gpu_check.sh).

    python benchmarks/semi_structured.py [--out semi-structured.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

SHAPES = [(2048, 4096, 4096), (2048, 4096, 11008), (8192, 768, 3072)]  # tokens, in, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA: torch's semi-structured sparse kernels run on NVIDIA GPUs (sm_80+)")
        return 0
    import dsd_kernels as dk
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for tokens, n_in, n_out in SHAPES:
            layer = torch.nn.Linear(n_in, n_out, device="cuda", dtype=dtype)
            x = torch.randn(tokens, n_in, device="cuda", dtype=dtype)
            model = dk.nn.sparsify(torch.nn.Sequential(layer), "2:4")
            dense_weight = (model[0].weight * model[0].mask.to_bool()).detach().clone()
            bias = model[0].bias.detach().clone()
            dense = Timer("F.linear(x, w, b)", globals=dict(F=F, x=x, w=dense_weight, b=bias)).blocked_autorange(
                min_run_time=0.5).median
            with torch.no_grad():
                sparse_model = dk.nn.to_semi_structured(model)
                want = F.linear(x, dense_weight, bias)
                got = sparse_model(x)
                sparse = Timer("m(x)", globals=dict(m=sparse_model, x=x)).blocked_autorange(min_run_time=0.5).median
            row = {"dtype": str(dtype), "tokens": tokens, "in": n_in, "out": n_out, "dense_s": dense,
                   "semi_structured_s": sparse, "speedup": dense / sparse,
                   "max_abs_diff": float((got.float() - want.float()).abs().max())}
            rows.append(row)
            print(f"{dtype} {tokens}x{n_in}->{n_out}: dense {dense * 1e3:.3f} ms, 2:4 {sparse * 1e3:.3f} ms "
                  f"({row['speedup']:.2f}x), max |diff| {row['max_abs_diff']:.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
