"""`dsd-kernels` command line: train (the DSD job: train.py) | study (study.py) | bench (bench/command.py) | info."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def _cmd_info(args) -> int:
    from .. import __version__, _backend
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
    if "cpp" in available:
        print(f"  cpp CPU kernels' vector ISA: {_backend.cpp_cpu_capability()}")
        print(f"  cpp masked_linear, kept tiles of fp32 on CPU: {_backend.cpp_tile_kernel()}")
    print("\nregistry (per op and device, auto takes the first available row serving the dtypes):")
    columns = ("op", "backend", "device", "dtypes", "role", "available")
    rows = [{**r, "available": "yes" if r["available"] else f"no: {r['why']}"} for r in _backend.table()]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  " + "  ".join(c.ljust(widths.get(c, 0)) for c in columns))
    for r in rows:
        print("  " + "  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in columns))
    return 0


def _launch_data_parallel(args, argv: list[str]) -> int:
    """Re-run this train command under torchrun with args.nproc processes on this machine."""
    import subprocess
    import time

    out = args.resume or args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    rest, skip = [], False
    for a in argv:  # drop --nproc N (and --out, set explicitly so every rank writes one folder)
        if skip:
            skip = False
        elif a in ("--nproc", "--out"):
            skip = True
        elif not a.startswith(("--nproc=", "--out=")):
            rest.append(a)
    if not args.resume:
        rest += ["--out", out]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "dsd_kernels.app.cli", *rest]
    return subprocess.call(cmd)


def _init_data_parallel(args) -> str | None:
    """Under torchrun: join the process group; returns this rank's device (None: single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


# train options -> TrainConfig fields, for comparing a resumed job's command line with its config
_TRAIN_FIELDS = {"protocol": "protocol", "data": "data", "model": "models", "sparsity": "sparsity",
                 "epochs": "epochs", "cycles": "cycles", "seeds": "seeds", "lr": "lr",
                 "sparse_lr_scale": "sparse_lr_scale", "redense_lr_scale": "redense_lr_scale",
                 "first_conv": "first_conv", "ramp_epochs": "ramp_epochs", "ramp_every": "ramp_every",
                 "block": "block",
                 "optimizer": "optimizer", "batch_size": "batch_size",
                 "train_samples": "train_samples", "checkpoint_every": "checkpoint_every",
                 "nproc": "nproc", "fsdp": "fsdp", "device": "device"}


def _sparsity(text: str):
    """--sparsity: a float, or an N:M pattern kept as text (TrainConfig checks both)."""
    try:
        return float(text)
    except ValueError:
        if ":" in text:
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor an N:M pattern such as 2:4") from None


def _given(argv: list[str], train: argparse.ArgumentParser) -> set[str]:
    """dests of the train options written on the command line."""
    given = set()
    for action in train._actions:
        for option in action.option_strings:
            if any(token == option or token.startswith(option + "=") for token in argv):
                given.add(action.dest)
    return given


def _config_value(args, dest: str):
    value = getattr(args, dest)
    if dest == "model":
        from .models import MODELS
        return list(MODELS) if value == "all" else [value]
    if dest == "epochs":
        return list(value)
    if dest == "train_samples":
        return value if value > 0 else None
    return value


def _cmd_study(args) -> int:
    from .study import MODELS, run_study
    command = "dsd-kernels study --out " + args.out + ("" if args.seeds == 10 else f" --seeds {args.seeds}") + \
        ("" if args.workers == 2 else f" --workers {args.workers}") + (" --quick" if args.quick else "") + \
        ("" if not args.models else " --models " + " ".join(args.models))
    try:
        study = run_study(args.out, seeds=args.seeds, workers=args.workers, quick=args.quick, command=command,
                          progress=not args.no_progress, models=tuple(args.models or MODELS))
    except ValueError as err:
        print(f"dsd-kernels study: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(study['cells'])} cells in {os.path.join(args.out, 'study.md')}")
    return 0


def _cmd_train(args, argv: list[str] | None = None) -> int:
    import time

    from .report import format_table
    from .config import TrainConfig, check_device
    from .train import run_job

    argv = list(argv if argv is not None else sys.argv[1:])

    def fail(message: str) -> int:
        print(f"dsd-kernels train: error: {message}", file=sys.stderr)
        return 2

    if args.nproc < 1:
        return fail(f"--nproc must be at least 1, got {args.nproc}")
    if args.train_samples is not None and args.train_samples < 0:
        return fail(f"--train-samples must be >= 0 (0 = all), got {args.train_samples}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.batch_size < args.nproc:
        return fail(f"--batch-size {args.batch_size} is smaller than --nproc {args.nproc}: some rank "
                    f"would get no sample of a batch")
    if args.fsdp and max(args.nproc, int(os.environ.get("WORLD_SIZE", "1"))) < 2 and not args.resume:
        return fail("--fsdp shards the models across processes: it needs --nproc 2 or more")
    if args.resume and args.quick:
        return fail("--quick cannot be combined with --resume (the job keeps its own settings)")
    if args.device is not None:
        try:
            check_device(args.device)
        except ValueError as err:
            return fail(str(err))
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch_data_parallel(args, argv)
    device = _init_data_parallel(args)
    if device is not None:
        args.device = device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    given = None
    if args.resume:
        out = args.resume
        cfg = TrainConfig()
        named = _given(argv, build_parser().train_parser) & set(_TRAIN_FIELDS)
        given = {_TRAIN_FIELDS[dest]: _config_value(args, dest) for dest in named if dest != "nproc"}
        if args.device is not None:
            given["device"] = args.device
    else:
        cfg = TrainConfig(protocol=args.protocol, data=args.data, sparsity=args.sparsity, lr=args.lr,
                          seeds=args.seeds, sparse_lr_scale=args.sparse_lr_scale,
                          redense_lr_scale=args.redense_lr_scale, first_conv=args.first_conv,
                          ramp_epochs=args.ramp_epochs, ramp_every=args.ramp_every,
                          block=None if args.block is None else list(args.block),
                          device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          checkpoint_every=args.checkpoint_every, batch_size=args.batch_size,
                          cycles=args.cycles, optimizer=args.optimizer, nproc=world_size, fsdp=args.fsdp)
        if args.model != "all":
            cfg.models = [args.model]
        if args.epochs:
            cfg.epochs = list(args.epochs)
        if args.train_samples is not None:
            cfg.train_samples = args.train_samples if args.train_samples > 0 else None
        elif args.data not in (None, "mnist1d"):
            cfg.train_samples = None  # the whole training set of other data
        if args.quick:
            cfg.quick = True
            cfg.epochs = args.epochs and list(args.epochs) or [3, 3, 3]
            cfg.seeds = min(cfg.seeds, 2)
            if args.train_samples is None and args.data in (None, "mnist1d"):
                cfg.train_samples = 500
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out) and not os.path.isdir(out):
        return fail(f"{'--resume' if args.resume else '--out'} {out} is a file, not a folder")
    try:
        report = run_job(cfg, out, resume=bool(args.resume), progress=not args.no_progress, given=given)
    except ValueError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        kept = (f"checkpoints every {cfg.checkpoint_every} epochs in {os.path.join(out, 'checkpoints')}"
                if cfg.checkpoint_every else "no checkpoints (--checkpoint-every 0): unfinished runs restart")
        print(f"\ndsd-kernels train: interrupted; finished runs are in {os.path.join(out, 'runs')}, {kept}; "
              f"continue with: dsd-kernels train --resume {out}", file=sys.stderr)
        return 130
    finally:
        if device is not None:
            torch.distributed.destroy_process_group()
    if device is not None and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 prints the report
    print()
    print(format_table(report))
    print(f"report: {os.path.join(out, 'report.md')} (+ report.json, accuracy.png, differences.png"
          f"{'' if report['config'].get('protocol') == 'sparse' else ', weights.png'}); "
          f"{report['elapsed_s']:.0f} s of training on {report['config']['device']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and which backends are available and why")
    p.set_defaults(func=_cmd_info)
    from .models import MODELS
    from .config import DEFAULT_SPARSITY, PROTOCOL_DEFAULTS, PROTOCOLS, TrainConfig
    d = TrainConfig()  # the job's defaults, stated once
    p = sub.add_parser("train", help="DSD vs its baselines (the paper's protocol) on MNIST-1D and digits",
                       description="Pre-train dense per seed, then compare the converged model, "
                                   "continuing it at a lower learning rate and DSD (--protocol paper); "
                                   "or train every arm from scratch for the same epochs (--protocol "
                                   "matched); or train sparse from scratch: RigL against dense, a static "
                                   "magnitude mask and SET (--protocol sparse). Reports paired differences, "
                                   "plots and per-phase sparsity.")
    p.add_argument("--protocol", default=d.protocol, choices=list(PROTOCOLS),
                   help=f"paper: DSD from a converged dense model vs that model and vs continuing it "
                        f"dense at DSD's rates (llr: lr x --sparse-lr-scale, then that x "
                        f"--redense-lr-scale; by default lr/10, then lr/100); matched: every arm from scratch, same epochs; "
                        f"sparse: dense, static, SET and RigL from scratch at --sparsity, the same epochs (the sum of "
                        f"--epochs) and step schedule (lr/10 for the last third), masks updated every epoch until 3/4 "
                        f"of the steps ({d.protocol})")
    p.add_argument("--data", default=d.data,
                   help="mnist1d (generated), digits, or PATH.npz for every model (default: each "
                        "model's own: mnist1d for mlp and cnn, digits for cnn2d)")
    p.add_argument("--model", default="all", choices=["all", *MODELS], help="default: all")
    p.add_argument("--sparsity", type=_sparsity, default=None,
                   help=f"uniform sparsity: a fraction in [0, 1), or (DSD) an N:M pattern such as 2:4 "
                        f"(N of every M consecutive weights of a row kept) (paper and matched "
                        f"{DEFAULT_SPARSITY['paper']}, sparse {DEFAULT_SPARSITY['sparse']})")
    p.add_argument("--epochs", type=int, nargs=3, metavar=("D", "S", "R"),
                   help=f"dense (paper: pre-training), sparse, re-dense epochs (paper "
                        f"{' '.join(map(str, TrainConfig(protocol='paper').epochs))}, matched "
                        f"{' '.join(map(str, TrainConfig(protocol='matched').epochs))})")
    paper, matched = (PROTOCOL_DEFAULTS[name] for name in ("paper", "matched"))
    p.add_argument("--sparse-lr-scale", type=float,
                   help=f"the sparse phase's learning rate is --lr times this (paper "
                        f"{paper['sparse_lr_scale']}, matched {matched['sparse_lr_scale']})")
    p.add_argument("--redense-lr-scale", type=float,
                   help=f"the re-dense phase's learning rate is the sparse phase's times this, as "
                        f"DSDScheduler's redense_lr_scale (paper "
                        f"{paper['redense_lr_scale']}, matched {matched['redense_lr_scale']})")
    p.add_argument("--first-conv", choices=["dense", "pruned"],
                   help=f"whether DSD prunes the CNNs' first convolution (paper {paper['first_conv']}, "
                        f"as the paper; matched {matched['first_conv']})")
    p.add_argument("--ramp-epochs", type=int, default=d.ramp_epochs, metavar="R",
                   help="gradual pruning: reach --sparsity over the first R sparse epochs by the cubic "
                        "schedule (0: prune at once)")
    p.add_argument("--ramp-every", type=int, default=d.ramp_every, metavar="E",
                   help=f"epochs between the gradual prunes (R a multiple of E) ({d.ramp_every})")
    p.add_argument("--block", type=int, nargs=2, metavar=("BH", "BW"),
                   help="block DSD: prune --sparsity of each weight's BH x BW tiles; the MLP's Linear layers "
                        "skip the pruned tiles while sparse (64 64: the matmul's tile); convolutions are "
                        "pruned by tiles too, without a speedup")
    p.add_argument("--cycles", type=int, default=d.cycles,
                   help=f"sparse+re-dense cycles, 2 = DSDSD ({d.cycles})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"number of seeds ({d.seeds})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate of the dense phase ({d.lr})")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"],
                   help=f"MaskedSGD with momentum or MaskedAdamW ({d.optimizer}; AdamW wants a "
                        f"smaller --lr, e.g. 0.001)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"({d.batch_size})")
    p.add_argument("--train-samples", type=int,
                   help=f"training samples to use (mnist1d: {d.train_samples} of 4000; 0 = all; "
                        f"applies to --data, else to mnist1d only)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", help="output folder (default runs/<timestamp>)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help="checkpoint every N epochs so --resume can continue a killed job")
    p.add_argument("--resume", metavar="DIR", help="continue the job in DIR")
    p.add_argument("--quick", action="store_true", help="a small run for smoke tests (minutes on 2 CPU cores, not seconds)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine, via torchrun (gloo on CPU, nccl on GPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --nproc N: shard the models with FSDP2 instead of DDP; checkpoints hold whole "
                        "state dicts, so --resume may use another --nproc")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    parser.train_parser = p
    p = sub.add_parser("study", help="where DSD helps: DSD - baseline and DSD - llr with 95%% intervals across "
                                     "sparsity, learning-rate ladder, training-set size and model")
    p.add_argument("--out", default="runs/study", help="the study's folder (default runs/study; the committed one "
                                                       "is docs/study); an interrupted study resumes there")
    p.add_argument("--seeds", type=int, default=10, help="seeds per cell (default 10)")
    p.add_argument("--workers", type=int, default=2,
                   help="training processes, one thread each (default 2: one per core of a 2-core machine)")
    p.add_argument("--models", nargs="*", default=None, help="a subset of mlp cnn cnn2d (default: all three)")
    p.add_argument("--quick", action="store_true", help="tiny epochs and data: a smoke run, not the study")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_study)
    from .bench.command import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is _cmd_train:
        return _cmd_train(args, argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
