"""`dsd-kernels bench`: its arguments and what it runs (the command line's other parts: app/cli.py)."""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch


def _linear_shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKENSxINxOUT, e.g. 512x1024x1024")
    if min(tokens, d_in, d_out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has a size below 1")
    return tokens, d_in, d_out


def cmd_bench(args) -> int:
    from .. import bench as B
    if args.predict:  # a cost model, not a measurement: printed apart, never in the results files
        import json

        from ..._files import atomic_write_text
        from . import cost_model
        uncovered = [op for op in args.ops or () if op not in cost_model.SUITES]
        if uncovered:
            print(f"dsd-kernels bench: error: --predict has no cost model for --ops {' '.join(uncovered)} "
                  f"(it covers {', '.join(cost_model.SUITES)})", file=sys.stderr)
            return 2
        rows = cost_model.predict(args.predict, args.ops)
        print(cost_model.format_predictions(args.predict, rows))
        if args.out:
            atomic_write_text(args.out, json.dumps({"predicted_for": cost_model.PEAKS[args.predict].name,
                                                    "note": "roofline predictions, not measurements",
                                                    "rows": rows}, indent=1))
            print(f"wrote {args.out}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suites = args.ops or list(B.CASE_FACTORIES)
    results = []
    import time
    out = args.out or os.path.join("runs", f"bench-{time.strftime('%Y%m%d-%H%M%S')}", f"{B.device_label(device)}.json")
    if os.path.isdir(out):
        print(f"dsd-kernels bench: error: --out {out} is a folder; name the results file", file=sys.stderr)
        return 2
    if os.path.exists(out) and not args.merge:
        print(f"dsd-kernels bench: error: --out {out} exists; pass --merge to update its cases (the others are "
              f"kept), or name another file", file=sys.stderr)
        return 2
    env = B.environment(device)
    print(f"timing our backends {args.backends or B.benchmark_backends(device)} against the "
          f"torch baselines on {device}, into {out}")
    for suite in suites:
        kwargs = {"sizes_m": tuple(args.sizes)} if suite == "magnitude_select" and args.sizes else {}
        if suite == "masked_linear" and args.linear_shapes:
            kwargs = {"shapes": args.linear_shapes}
        for case in B.CASE_FACTORIES[suite](device, **kwargs):
            r = B.run_case(case, args.min_run_time, args.backends or B.benchmark_backends(device, case.op),
                           kernel_times=device.startswith("cuda"))
            print(B.format_row(r), flush=True)
            results.append(r)
            # after every case: a run cut short (a time-boxed GPU lease) keeps what it timed
            B.write_results(out, env, results)
            # the case's models go before the next is built (the training cases of GPT-2 small hold
            # several models with optimizer state each: two cases at once outgrow a 24 GiB machine)
            del case
            gc.collect()
    print(f"wrote {os.path.abspath(out)}")
    return 0


def add_bench_parser(sub) -> None:
    """The `bench` subcommand on the command line's subparsers."""
    from . import CASE_FACTORIES
    p = sub.add_parser("bench", help="time every op against its torch baselines, write JSON")
    p.add_argument("--ops", nargs="*", choices=sorted(CASE_FACTORIES),
                   help="benchmark suites (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--backends", nargs="*", choices=["torch", "cpp", "triton"],
                   help="our backends to time (default: the compiled ones present for the device)")
    p.add_argument("--sizes", nargs="*", type=int, help="threshold sizes in M elements (default 1 16 64)")
    p.add_argument("--linear-shapes", nargs="*", type=_linear_shape, metavar="TOKENSxINxOUT",
                   help="masked_linear shapes, e.g. 512x1024x1024 (default: the suite's)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (default 0.5)")
    p.add_argument("--out", help="results JSON (default runs/bench-<timestamp>/<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="--out exists: replace the cases timed now and keep the others (how "
                        "benchmarks/results/<device>.json is updated one op at a time)")
    p.add_argument("--predict", choices=["h100", "a100", "h200"],
                   help="print the cost model's predicted GPU times instead of measuring (no GPU needed)")
    p.set_defaults(func=cmd_bench)
