"""GPU only: the multi-tensor Triton kernels' GPU time per call against their tile size
(tile_words mask words = 32 x tile_words elements per program), to choose the default
(`gpu_default` in the launchers). Prints one line per (kernel, tile_words) and writes JSON.

    python benchmarks/sweep_tile_words.py --out sweep.json
"""
import argparse
import json

import torch

from dsd_kernels.app.bench import device_time, gpt2_small_param_shapes, resnet50_weight_shapes
from dsd_kernels.masks import Mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tile-words", type=int, nargs="*", default=[32, 64, 128])
    args = parser.parse_args()
    from dsd_kernels.backends.triton import apply_masks, masked_adamw, masked_sgd
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for set_name, shapes in (("gpt2-small", gpt2_small_param_shapes()), ("resnet50", resnet50_weight_shapes())):
        params = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        words = [Mask.from_bool(torch.rand(s, generator=gen, device="cuda") > 0.5).packed if len(s) > 1
                 else None for s in shapes]
        numel = sum(p.numel() for p in params)
        masked_numel = sum(p.numel() for p, w in zip(params, words) if w is not None)
        kernels = {
            "masked_adamw": (28.125 * numel, lambda tw: masked_adamw.masked_adamw_(
                params, grads, m, v, [], steps, words, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.01, amsgrad=False, maximize=False, tile_words=tw)),
            "masked_sgd": (20.125 * numel, lambda tw: masked_sgd.masked_sgd_(
                params, grads, m, words, [False] * len(params), lr=0.1, momentum=0.9, dampening=0.0,
                weight_decay=1e-4, nesterov=False, maximize=False, tile_words=tw)),
            "apply_masks": (8.125 * masked_numel, lambda tw: apply_masks.apply_masks_(
                [p for p, w in zip(params, words) if w is not None], [w for w in words if w is not None],
                tile_words=tw)),
        }
        for name, (nbytes, step) in kernels.items():
            for tile_words in args.tile_words:
                t = device_time(lambda: step(tile_words), calls=20)
                row = {"set": set_name, "kernel": name, "tile_words": tile_words, "gpu_s": t,
                       "GBps": nbytes / t / 1e9 if t else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
