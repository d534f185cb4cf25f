"""Summary statistics, report.json / report.md, and the plots of `dsd-kernels train`."""
from __future__ import annotations

import json
import os
import statistics

from .._files import atomic_path, atomic_write_text
from .scheduler import PhasePlan
from .train import METHODS, TrainConfig

PHASE_SNAPSHOTS = (("dense", "after dense"), ("pruned", "right after pruning"),
                   ("sparse", "after sparse"), ("redense", "after re-dense"))


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_report(cfg: TrainConfig, runs: list[dict], elapsed_s: float | None = None) -> dict:
    from dataclasses import asdict

    summary = {}
    for model in cfg.models:
        acc = {m: {r["seed"]: r["test_accuracy"] for r in runs if r["model"] == model and r["method"] == m}
               for m in METHODS}
        entry = {"methods": {m: _mean_std(list(acc[m].values())) for m in METHODS if acc[m]},
                 "paired": {}}
        for base in ("dense", "llr"):
            seeds = sorted(set(acc["dsd"]) & set(acc[base]))
            if seeds:
                diffs = [acc["dsd"][s] - acc[base][s] for s in seeds]
                entry["paired"][f"dsd-{base}"] = {**_mean_std(diffs), "wins": sum(d > 0 for d in diffs),
                                                  "ties": sum(d == 0 for d in diffs)}
        phases = [r["phases"] for r in runs if r["model"] == model and r["method"] == "dsd"]
        if phases:
            entry["dsd_phases"] = [
                {"name": p["name"], "test_accuracy": _mean_std([ph[i]["test_accuracy"] for ph in phases]),
                 "measured_sparsity": {layer: statistics.fmean(ph[i]["measured_sparsity"][layer] for ph in phases)
                                       for layer in p["measured_sparsity"]}}
                for i, p in enumerate(phases[0])]
        summary[model] = entry
    report = {"config": asdict(cfg), "runs": runs, "summary": summary}
    if elapsed_s is not None:
        report["elapsed_s"] = elapsed_s
    return report


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = []
    for model, entry in report["summary"].items():
        samples = cfg["train_samples"] if cfg["train_samples"] is not None else "all"
        lines.append(f"{model} on {cfg['data']} ({samples} training samples, {cfg['seeds']} seeds, "
                     f"epochs {'+'.join(map(str, cfg['epochs']))}, sparsity {cfg['sparsity']})")
        lines.append("  method   test accuracy %")
        for m, s in entry["methods"].items():
            lines.append(f"  {m:<7}  {s['mean']:6.2f} +- {s['std']:.2f}")
        for name, p in entry["paired"].items():
            base = name.split("-")[1]
            lines.append(f"  DSD - {base:<5}  {p['mean']:+6.2f} +- {p['std']:.2f} points (paired by seed; "
                         f"DSD higher on {p['wins']}/{p['n']} seeds)")
        lines.append("")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    cfg = report["config"]
    out = ["# DSD vs dense training", "",
           f"Data `{cfg['data']}`, {cfg['train_samples'] or 'all'} training samples; models "
           f"{', '.join(cfg['models'])}; {cfg['seeds']} seeds; epochs dense {cfg['epochs'][0]}, sparse "
           f"{cfg['epochs'][1]}, re-dense {cfg['epochs'][2]} (x{cfg['cycles']}); sparsity {cfg['sparsity']}; "
           f"{cfg.get('optimizer', 'sgd').upper()} lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch "
           f"{cfg['batch_size']}; device {cfg['device']}.", ""]
    for model, entry in report["summary"].items():
        out += [f"## {model}", "", "| method | test accuracy % (mean +- std) |", "|---|---|"]
        out += [f"| {m} | {s['mean']:.2f} +- {s['std']:.2f} |" for m, s in entry["methods"].items()]
        out += ["", "| paired difference | points (mean +- std) | DSD higher on |", "|---|---|---|"]
        out += [f"| DSD - {name.split('-')[1]} | {p['mean']:+.2f} +- {p['std']:.2f} | {p['wins']}/{p['n']} seeds |"
                for name, p in entry["paired"].items()]
        if "dsd_phases" in entry:
            out += ["", "| DSD phase | test accuracy % at its end | mean measured sparsity |", "|---|---|---|"]
            for ph in entry["dsd_phases"]:
                sp = ph["measured_sparsity"]
                out.append(f"| {ph['name']} | {ph['test_accuracy']['mean']:.2f} +- {ph['test_accuracy']['std']:.2f}"
                           f" | {statistics.fmean(sp.values()):.3f} |")
        out.append("")
    out += ["![test accuracy](accuracy.png)", "", "![weight distribution](weights.png)", ""]
    return "\n".join(out)


def _save_figure(fig, path: str) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_accuracy(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    models = cfg["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False,
                             layout="constrained")
    # the last epoch of each phase but the last
    boundaries = [first + length for _, first, length in
                  PhasePlan(*cfg["epochs"], cycles=cfg["cycles"]).phases()[:-1]]
    for ax, model in zip(axes[0], models):
        for method in METHODS:
            curves = [[h["test_accuracy"] for h in r["history"]] for r in report["runs"]
                      if r["model"] == model and r["method"] == method]
            if not curves:
                continue
            epochs = range(1, len(curves[0]) + 1)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
            std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0
                   for i in range(len(curves[0]))]
            ax.plot(epochs, mean, label=method)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            alpha=0.2)
        for b in boundaries:
            ax.axvline(b + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{model}: test accuracy, mean +- std over {cfg['seeds']} seeds\n"
                     f"dashed: DSD phase boundaries (dense | sparse | re-dense)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.legend()
    _save_figure(fig, path)
    plt.close(fig)


def plot_weights(snapshots: dict, path: str) -> None:
    """Histograms of one layer's weights after each DSD phase (the paper's figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in snapshots if snapshots[m]]
    fig, axes = plt.subplots(max(1, len(models)), 4, figsize=(16, 3.4 * max(1, len(models))),
                             squeeze=False, layout="constrained")
    for row, model in zip(axes, models):
        snaps = snapshots[model]
        dense = snaps.get("dense")
        limit = float(dense.abs().max()) if dense is not None and dense.numel() else 1.0
        for ax, (key, title) in zip(row, PHASE_SNAPSHOTS):
            if key not in snaps:
                ax.set_visible(False)
                continue
            w = snaps[key].flatten().float()
            zero = float((w == 0).float().mean())
            # the exact zeros are one spike that would flatten the rest: count them in the title
            ax.hist(w[w != 0].numpy(), bins=120, range=(-limit, limit), color="C0")
            ax.set_title(f"{model}: {title}\n{zero:.1%} exactly zero (not drawn)", fontsize=10)
            ax.set_xlabel(f"weight ({w.numel()} in layer)")
    _save_figure(fig, path)
    plt.close(fig)


def write_report(report: dict, snapshots: dict, out_dir: str) -> None:
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    atomic_write_text(os.path.join(out_dir, "report.md"), _markdown(report))
    plot_accuracy(report, os.path.join(out_dir, "accuracy.png"))
    plot_weights(snapshots, os.path.join(out_dir, "weights.png"))

