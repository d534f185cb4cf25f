"""Sharded (DTensor Shard(0)) magnitude selection vs the local one, per element, on CPU.

    python benchmarks/sharded_select.py [--runs 9] [--out benchmarks/results/sharded-select-<device>.json]

Two gloo processes with one thread each hold half of every weight (as FSDP2 shards them) and
select with the backend the registry picks (C++ where built). The local baseline runs in the
same two processes at the same time, in alternating rounds: each selects its own shards as
plain tensors, with no collective (so both sides share the machine's memory bandwidth alike).
Both read the same elements per process, so sharded / local is the cost per element of
sharding: the collectives (each recorded with its bytes, from one sharded call on rank 0) and
whatever the per-shard kernels do more or less than the local kernel. A round counts as long as
its slower process, for both. Medians of many alternating rounds, and the fastest rounds beside
them: on a 2-core machine a collective now and then waits several milliseconds on a descheduled
peer, which the local rounds never do; and over several launches, whose medians differ.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = {"16M fp32": lambda g: [torch.randn(4096, 4096, generator=g)],
         "ResNet-50 weights": None}  # filled in main() (needs dsd_kernels.app.bench)


def _time_alternating(fns: dict, repeats: int) -> dict:
    """Seconds of each callable per round, timed in alternating rounds after one warm-up each."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _slowest_rank(ranks_times: list[dict]) -> dict:
    """Per callable, the median and fastest over rounds of the slowest rank's time in each round:
    a round of two processes takes as long as its slower process (a sharded round waits for it,
    and so would a local selection split between them)."""
    out = {}
    for name in ranks_times[0]:
        rounds = [max(t[name][i] for t in ranks_times) for i in range(len(ranks_times[0][name]))]
        out[name] = {"median": statistics.median(rounds), "min": min(rounds)}
    return out


def _weights(name):
    from dsd_kernels.app.bench import resnet50_weight_shapes
    g = torch.Generator().manual_seed(0)
    if name == "ResNet-50 weights":
        return [torch.randn(s, generator=g) for s in resnet50_weight_shapes()]
    return CASES[name](g)


def _worker(rank, world, init_file, out_file, repeats):
    torch.set_num_threads(1)
    import dsd_kernels as dk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        from dsd_kernels.distributed import COLLECTIVES
        out = {}
        for name in CASES:
            shards = [distribute_tensor(w, mesh, [Shard(0)]) for w in _weights(name)]
            plain = [s.to_local().clone() for s in shards]
            COLLECTIVES.clear()
            dk.magnitude_masks(shards, 0.5)
            collectives = [{"op": op, "bytes_per_rank": b} for op, b in COLLECTIVES]

            def sharded():
                dist.barrier()
                dk.magnitude_masks(shards, 0.5)

            def local():
                dist.barrier()  # both processes start together, as in the sharded rounds
                dk.magnitude_masks(plain, 0.5)
            times = _time_alternating({"sharded": sharded, "local": local}, repeats)
            ranks_times = [None] * world
            dist.all_gather_object(ranks_times, times)
            out[name] = _slowest_rank(ranks_times)
            out[name]["collectives"] = collectives
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(out, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # leave without interpreter teardown (the results are on disk, the group destroyed): now and
    # then a gloo thread left joinable aborts the process there (as tests/test_distributed.py notes)
    os._exit(0)


def _run(repeats: int) -> dict:
    """One launch of the two processes: per case, the timings and collectives of _worker."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "sharded.json")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), out_file, repeats), nprocs=2, join=True)
        with open(out_file) as f:
            return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=41, help="alternating rounds per launch")
    parser.add_argument("--runs", type=int, default=9,
                        help="launches of the two processes (the ratio varies between launches here)")
    parser.add_argument("--out", help="results JSON (default: print only)")
    args = parser.parse_args(argv)
    from dsd_kernels import _backend
    from dsd_kernels.app.bench import device_label, environment
    backend = _backend.resolve("magnitude_select_sharded", torch.device("cpu"), (torch.float32,)).backend
    runs = [_run(args.repeats) for _ in range(args.runs)]
    results = []
    for name in CASES:
        elements = sum(-(-w.shape[0] // 2) * (w.numel() // w.shape[0]) for w in _weights(name))  # rank 0's
        per_run = [{"sharded_s": r[name]["sharded"]["median"], "local_s": r[name]["local"]["median"],
                    "sharded_over_local": r[name]["sharded"]["median"] / r[name]["local"]["median"],
                    "fastest_sharded_over_fastest_local": r[name]["sharded"]["min"] / r[name]["local"]["min"]}
                   for r in runs]
        row = {"case": name, "op": "magnitude_masks", "sparsity": 0.5, "backend": backend,
               "processes": 2, "threads_per_process": 1, "elements_per_process": elements,
               "rounds_per_run": args.repeats,
               "sharded_over_local": statistics.median(r["sharded_over_local"] for r in per_run),
               "fastest_sharded_over_fastest_local": statistics.median(
                   r["fastest_sharded_over_fastest_local"] for r in per_run),
               "runs": per_run, "collectives_per_masks_call": runs[0][name]["collectives"]}
        results.append(row)
        print(f"{name} ({elements / 1e6:.1f}M elements per process): sharded/local = "
              + ", ".join(f"{r['sharded_over_local']:.2f}" for r in per_run)
              + f" in {len(runs)} runs (median {row['sharded_over_local']:.2f}); fastest rounds: "
              + ", ".join(f"{r['fastest_sharded_over_fastest_local']:.2f}" for r in per_run)
              + f" [{backend}]; collectives: "
              + ", ".join(f"{c['op']} {c['bytes_per_rank']} B" for c in row["collectives_per_masks_call"]))
    if args.out:
        env = environment("cpu")
        env["label"] = device_label("cpu")
        with open(args.out, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
