"""`dsd-kernels` command line: info | bench (| train, see dsd/)."""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def _cmd_info(args) -> int:
    from . import __version__, _backend
    print(f"dsd-kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton
        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads); no CUDA device")
    print(f"backend requested: {_backend.get_backend()}")
    available = _backend.available_backends()
    for name, why in _backend.reasons().items():
        print(f"  {name:<7} {'yes' if name in available else 'no ':<4} {why}")
    return 0


def _cmd_bench(args) -> int:
    from . import benchmarking as B
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suites = args.ops or list(B.CASE_FACTORIES)
    results = []
    for suite in suites:
        kwargs = {"sizes_m": tuple(args.sizes)} if suite == "threshold" and args.sizes else {}
        for case in B.CASE_FACTORIES[suite](device, **kwargs):
            r = B.run_case(case, args.min_run_time)
            print(B.format_row(r), flush=True)
            results.append(r)
    out = args.out or f"benchmarks/results/{B.device_label(device)}.json"
    B.write_results(out, B.environment(device), results)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and which backends are available and why")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time every op against its torch baselines, write JSON")
    from .benchmarking import CASE_FACTORIES
    p.add_argument("--ops", nargs="*", choices=sorted(CASE_FACTORIES),
                   help="benchmark suites (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--sizes", nargs="*", type=int, help="threshold sizes in M elements (default 1 16 64)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (default 0.5)")
    p.add_argument("--out", help="results JSON (default benchmarks/results/<device>.json)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
