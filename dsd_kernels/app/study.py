"""`dsd-kernels study`: where DSD helps. The paper protocol's arms (the dense pre-training as the
baseline, llr, dsd) across sparsity, the learning-rate ladder, the training-set size and the
three models, each cell's DSD - baseline and DSD - llr paired over seeds with 95% intervals.

Per (model, training-set size, seed) one dense pre-training is trained and shared, in memory, by
every cell of that model, size and seed: the llr arm once per ladder, the dsd arm once per ladder
and sparsity, each from the same weights, optimizer state and batch-order generator (as
`dsd-kernels train` shares its pre-training between arms). These units are independent: they run
in `workers` processes of one thread each, largest first, and their results are written as they
finish (`units/`), so an interrupted study resumes with the units it has.

The digits CNN trains on scikit-learn's digits, which has one size (all its training rows); the
MNIST-1D models run at each of SIZES, for the same epochs (at the larger size 4x the steps); the
report shows how much each pre-training still gained over its last CONVERGED_OVER epochs (all after
its learning-rate drop), the check that it converged.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict

import torch

from .._files import atomic_write_text
from .config import TrainConfig
from .report import paired_summary

SPARSITIES = (0.3, 0.5, 0.7)
# (sparse_lr_scale, redense_lr_scale), each relative to the phase before (DSDScheduler's meaning)
LADDERS = {"matched": (1.0, 0.1),  # sparse at the dense rate, re-dense at 1/10 (as --protocol matched)
           "paper": (0.1, 0.1)}    # the paper's: sparse at lr/10, re-dense at lr/100
SIZES = (1000, 4000)  # MNIST-1D training rows
EPOCHS = {1000: [30, 10, 10], 4000: [30, 10, 10]}  # pre-training, sparse, re-dense: at 4000 rows 4x the steps
CONVERGED_OVER = 5  # the convergence check: the pre-training's gain over its last epochs (after its rate drop)
MODELS = ("mlp", "cnn", "cnn2d")
DIGITS_SIZE = "all"  # the digits CNN's one size


def _config(model: str, size, ladder: str, sparsity: float, seeds: int, quick: bool) -> TrainConfig:
    sparse_scale, redense_scale = LADDERS[ladder]
    epochs = [2, 1, 1] if quick else EPOCHS[size if size != DIGITS_SIZE else 1000]
    cfg = TrainConfig(protocol="paper", models=[model], sparsity=sparsity, epochs=list(epochs), seeds=seeds,
                      sparse_lr_scale=sparse_scale, redense_lr_scale=redense_scale,
                      train_samples=(200 if quick else size) if size != DIGITS_SIZE else 1000)
    cfg.validate()
    return cfg


def units(seeds: int, models=MODELS) -> list[tuple[str, object, int]]:
    """(model, size, seed) of every unit, the most work first."""
    out = []
    for model in models:
        for size in (SIZES if model != "cnn2d" else (DIGITS_SIZE,)):
            out += [(model, size, seed) for seed in range(seeds)]
    cost = {"mlp": 1.0, "cnn": 2.0, "cnn2d": 1.0}
    return sorted(out, key=lambda u: -cost[u[0]] * (u[1] if u[1] != DIGITS_SIZE else 1000))


def _train(run) -> float:
    while run.epoch < run.epochs:
        run.run_epoch()
    return run.result()["test_accuracy"]


def run_unit(model: str, size, seed: int, seeds: int, quick: bool = False) -> dict:
    """One pre-training and every arm that starts from it; accuracies by arm, ladder and sparsity."""
    from .data import load_data
    from .run import Run
    torch.set_num_threads(1)
    started = time.perf_counter()
    base_cfg = _config(model, size, "matched", SPARSITIES[0], seeds, quick)
    data = load_data(base_cfg.data_for(model), base_cfg.train_samples if base_cfg.data_for(model) == "mnist1d"
                     else None)
    pre = Run(base_cfg, data, "baseline", model, seed)
    baseline = _train(pre)
    start = pre.state_dict()
    history = [h["test_accuracy"] for h in pre.history]
    last = min(CONVERGED_OVER, len(history) - 1)
    out = {"model": model, "size": size, "seed": seed, "data": data.name, "train_rows": len(data.x_train),
           "baseline": baseline, "pretraining_history": history,
           "pretraining_final_gain": history[-1] - history[-last - 1] if last > 0 else None, "llr": {}, "dsd": {}}
    for ladder in LADDERS:
        out["llr"][ladder] = _train(Run(_config(model, size, ladder, SPARSITIES[0], seeds, quick), data, "llr",
                                        model, seed, start=start))
        for sparsity in SPARSITIES:
            cfg = _config(model, size, ladder, sparsity, seeds, quick)
            out["dsd"][f"{ladder}@{sparsity}"] = _train(Run(cfg, data, "dsd", model, seed, start=start))
    out["elapsed_s"] = time.perf_counter() - started
    return out


def _unit_path(out_dir: str, unit) -> str:
    model, size, seed = unit
    return os.path.join(out_dir, "units", f"{model}-{size}-seed{seed}.json")


def _worker(args):
    unit, out_dir, seeds, quick = args
    result = run_unit(*unit, seeds=seeds, quick=quick)
    atomic_write_text(_unit_path(out_dir, unit), json.dumps(result, allow_nan=False))
    return result


def _by_model_and_size(results: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """((model, size), the units by seed), in MODELS' order, then by size."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["model"], r["size"]), []).append(r)
    order = {m: i for i, m in enumerate(MODELS)}
    return [(key, sorted(rs, key=lambda r: r["seed"]))
            for key, rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], str(kv[0][1]).zfill(6)))]


def summarize(results: list[dict]) -> list[dict]:
    """Per (model, size, ladder, sparsity): DSD - baseline and DSD - llr paired by seed."""
    cells = []
    for (model, size), rs in _by_model_and_size(results):
        for ladder in LADDERS:
            for sparsity in SPARSITIES:
                key = f"{ladder}@{sparsity}"
                cells.append({"model": model, "size": size, "ladder": ladder, "sparsity": sparsity,
                              "seeds": len(rs),
                              "dsd_mean": statistics.fmean(r["dsd"][key] for r in rs),
                              "dsd_minus_baseline": paired_summary([r["dsd"][key] - r["baseline"] for r in rs]),
                              "dsd_minus_llr": paired_summary([r["dsd"][key] - r["llr"][ladder] for r in rs])})
    return cells


def _fmt(p: dict) -> str:
    interval = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
    return f"{p['mean']:+.2f}{interval} {p['verdict']}"


def cells_table(study: dict) -> str:
    """Every cell: the DSD arm's mean accuracy and both paired differences with interval and verdict."""
    lines = ["| model | size | ladder | sparsity | DSD acc | DSD - baseline | DSD - llr |",
             "|---|---|---|---|---|---|---|"]
    for c in study["cells"]:
        lines.append(f"| {c['model']} | {c['size']} | {c['ladder']} | {c['sparsity']} | {c['dsd_mean']:.2f} | "
                     f"{_fmt(c['dsd_minus_baseline'])} | {_fmt(c['dsd_minus_llr'])} |")
    return "\n".join(lines)


def study_markdown(study: dict) -> str:
    cfg = study["settings"]
    lines = ["# Where DSD helps: the study", "",
             f"Written by `{study['command']}` in {study['elapsed_s'] / 60:.1f} minutes on "
             f"{study['environment'].get('cpu_threads', '?')} CPU threads ({study['environment'].get('cpu', '?')}, "
             f"{study['environment'].get('cpu_capability', '?')}), {study['workers']} worker processes of one thread "
             f"(wall time over every segment of the study; the units' own training took "
             f"{study['unit_seconds'] / 60:.1f} minutes in all).",
             "",
             "Each cell pairs, seed by seed, the DSD arm's test accuracy (%) with the dense pre-training it starts "
             "from (baseline) and with the llr arm (dense at DSD's learning rates from the same start): the mean "
             "difference, its 95% interval (Student's t over the seeds) and the verdict. Ladders: `matched` runs "
             "the sparse phase at the dense rate and re-denses at 1/10 of it; `paper` runs sparse at lr/10 and "
             "re-dense at lr/100. MNIST-1D sizes are training rows; the digits CNN trains on all of digits' "
             "training rows. Epochs (pre-training, sparse, re-dense): "
             + ", ".join(f"{size} rows {e}" for size, e in cfg["epochs"].items()) + ".", "",
             cells_table(study)]
    lines += ["", f"Did the pre-training converge? Its test accuracy's gain over its last {CONVERGED_OVER} epochs, all "
              "after its learning-rate drop (mean over seeds, and the largest):", "",
              f"| model | size | baseline acc | gain over the last {CONVERGED_OVER} epochs | largest gain |",
              "|---|---|---|---|---|"]
    for c in study["convergence"]:
        lines.append(f"| {c['model']} | {c['size']} | {c['baseline_mean']:.2f} | {c['gain_mean']:+.2f} | "
                     f"{c['gain_max']:+.2f} |")
    counts = {}
    for c in study["cells"]:
        for key in ("dsd_minus_baseline", "dsd_minus_llr"):
            v = c[key]["verdict"]
            v = "no difference" if v.startswith("no difference") else v
            counts[(key, v)] = counts.get((key, v), 0) + 1
    lines += ["", "Verdicts over the cells: " + "; ".join(
        f"DSD - {'baseline' if k == 'dsd_minus_baseline' else 'llr'} {v}: {n}" for (k, v), n in sorted(counts.items()))
        + ".", ""]
    return "\n".join(lines)


def plot_study(study: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = study["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(cells) + 1.5), sharey=True)
    labels = [f"{c['model']} {c['size']} {c['ladder']} s={c['sparsity']}" for c in cells]
    for ax, key, title in zip(axes, ("dsd_minus_baseline", "dsd_minus_llr"), ("DSD - baseline", "DSD - llr")):
        for i, c in enumerate(cells):
            p = c[key]
            low, high = p["ci95"] if p["ci95"] else (p["mean"], p["mean"])
            color = "tab:green" if p["verdict"] == "better" else "tab:red" if p["verdict"] == "worse" else "tab:gray"
            ax.plot([low, high], [i, i], color=color)
            ax.plot([p["mean"]], [i], "o", color=color, ms=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{title}, test accuracy points (95% interval)")
    axes[0].set_yticks(range(len(cells)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(out_dir: str, *, seeds: int = 10, workers: int = 2, quick: bool = False, command: str = "",
              progress: bool = True, models=MODELS) -> dict:
    """Train every unit not already under out_dir/units/, then write study.json, study.md and
    differences.png from all of them."""
    import multiprocessing

    from tqdm.auto import tqdm

    from .bench.timing import environment
    if seeds < 2:
        raise ValueError(f"--seeds must be at least 2 for an interval, got {seeds}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    os.makedirs(os.path.join(out_dir, "units"), exist_ok=True)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"--models must be among {MODELS}, got {list(models)}")
    settings = {"seeds": seeds, "quick": quick, "models": list(models), "sparsities": list(SPARSITIES),
                "ladders": {k: list(v) for k, v in LADDERS.items()}, "sizes": list(SIZES),
                "epochs": {str(k): v for k, v in EPOCHS.items()} if not quick else {"all": [2, 1, 1]},
                "train": asdict(TrainConfig(protocol="paper"))}
    settings_path = os.path.join(out_dir, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f) != settings:
                raise ValueError(f"{settings_path} holds another study's settings: give another --out")
    else:
        atomic_write_text(settings_path, json.dumps(settings, indent=1))
    todo, results = [], []
    for unit in units(seeds, models):
        path = _unit_path(out_dir, unit)
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            todo.append(unit)
    started = time.perf_counter()
    with tqdm(total=len(todo), unit="unit", disable=not progress) as bar:
        if workers == 1:
            for unit in todo:
                results.append(_worker((unit, out_dir, seeds, quick)))
                bar.update(1)
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap_unordered(_worker, [(u, out_dir, seeds, quick) for u in todo]):
                    results.append(result)
                    bar.update(1)
    elapsed = time.perf_counter() - started
    convergence = []
    for (model, size), rs in _by_model_and_size(results):
        gains = [r["pretraining_final_gain"] for r in rs if r["pretraining_final_gain"] is not None]
        convergence.append({"model": model, "size": size, "baseline_mean": statistics.fmean(r["baseline"] for r in rs),
                            "gain_mean": statistics.fmean(gains) if gains else math.nan,
                            "gain_max": max(gains) if gains else math.nan})
    # the wall time of every segment: an interrupted study adds its earlier segments' time
    previous = os.path.join(out_dir, "study.json")
    if os.path.exists(previous):
        with open(previous) as f:
            elapsed += json.load(f).get("elapsed_s", 0.0)
    env = environment("cpu")
    study = {"command": command or "dsd-kernels study", "settings": settings, "environment": env,
             "workers": workers, "elapsed_s": elapsed, "unit_seconds": sum(r["elapsed_s"] for r in results),
             "cells": summarize(results), "convergence": convergence, "units": results}
    atomic_write_text(os.path.join(out_dir, "study.json"), json.dumps(study, indent=1, allow_nan=False))
    atomic_write_text(os.path.join(out_dir, "study.md"), study_markdown(study))
    plot_study(study, os.path.join(out_dir, "differences.png"))
    return study
