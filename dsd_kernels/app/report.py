"""Summary statistics, report.json / report.md, and the plots of `dsd-kernels train`."""
from __future__ import annotations

import json
import math
import os
import statistics

from .._files import atomic_path, atomic_write_text
from ..dsd.plan import PhasePlan
from .config import ARMS, FOCAL_ARM, TrainConfig

LABELS = {"dsd": "DSD", "rigl": "RigL", "set": "SET"}


def _label(arm: str) -> str:
    return LABELS.get(arm, arm)


def _pair_label(name: str) -> str:
    """"dsd-llr" -> "DSD - llr" (a paired entry's key: focal arm - other arm)."""
    focal, base = name.split("-", 1)
    return f"{_label(focal)} - {base}"

PHASE_SNAPSHOTS = (("dense", "after dense"), ("pruned", "right after pruning"),
                   ("sparse", "after sparse"), ("redense", "after re-dense"))


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_summary(diffs: list[float]) -> dict:
    """Paired differences over seeds: mean, std, higher / tied / lower counts, the 95% interval of
    the mean (Student's t on n - 1 degrees of freedom; none from one seed) and its verdict."""
    out = {**_mean_std(diffs), "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
           "losses": sum(d < 0 for d in diffs)}
    n = len(diffs)
    if n < 2:
        out["ci95"] = None
        out["verdict"] = "one seed gives no interval"
        return out
    from scipy.stats import t
    half = float(t.ppf(0.975, n - 1)) * out["std"] / math.sqrt(n)
    low, high = out["mean"] - half, out["mean"] + half
    out["ci95"] = [low, high]
    out["verdict"] = ("better" if low > 0 else "worse" if high < 0 else f"no difference at {n} seeds")
    return out


def build_report(cfg: TrainConfig, runs: list[dict], elapsed_s: float | None = None) -> dict:
    """Per model: each arm's test accuracy (mean, std over the seeds that did not diverge), the
    paired per-seed differences DSD - each baseline with wins, the DSD phases' accuracies."""
    from dataclasses import asdict

    arms, focal = cfg.arms, cfg.focal_arm
    summary = {}
    for model in cfg.models:
        mine = [r for r in runs if r["model"] == model]
        acc = {m: {r["seed"]: r["test_accuracy"] for r in mine if r["method"] == m and not r.get("diverged")}
               for m in arms}
        entry = {"data": next((r["data"] for r in mine if "data" in r), cfg.data_for(model)),
                 "methods": {m: _mean_std(list(acc[m].values())) for m in arms if acc[m]},
                 "diverged": {m: sorted(r["seed"] for r in mine if r["method"] == m and r.get("diverged"))
                              for m in arms},
                 "paired": {}}
        for base in (a for a in arms if a != focal):
            seeds = sorted(set(acc[focal]) & set(acc[base]))
            if seeds:
                diffs = [acc[focal][s] - acc[base][s] for s in seeds]
                entry["paired"][f"{focal}-{base}"] = {**paired_summary(diffs), "seeds": seeds, "differences": diffs}
        fractions = {m: [r["pruned_fraction"] for r in mine if r["method"] == m and "pruned_fraction" in r
                         and not r.get("diverged")] for m in arms}
        if any(fractions.values()):  # the sparse protocol's arms: the pruned fraction at the end
            entry["pruned_fraction"] = {m: {k: statistics.fmean(f[k] for f in fs) for k in ("pruned_layers", "whole_model")}
                                        for m, fs in fractions.items() if fs}
        phases = [r["phases"] for r in mine if r["method"] == "dsd" and not r.get("diverged")]
        if phases:
            entry["dsd_phases"] = [
                {"name": p["name"], "test_accuracy": _mean_std([ph[i]["test_accuracy"] for ph in phases]),
                 "measured_sparsity": {layer: statistics.fmean(ph[i]["measured_sparsity"][layer] for ph in phases)
                                       for layer in p["measured_sparsity"]},
                 **({"pruned_fraction": {k: statistics.fmean(ph[i]["pruned_fraction"][k] for ph in phases)
                                         for k in ("pruned_layers", "whole_model")}}
                    if all("pruned_fraction" in ph[i] for ph in phases) else {})}
                for i, p in enumerate(phases[0])]
        summary[model] = entry
    from .bench.timing import environment
    env = environment(cfg.device)
    try:
        from importlib.metadata import version
        env["dsd_kernels"] = version("dsd-kernels")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        env["dsd_kernels"] = None
    # what decides the bits of a run: torch's CPU kernels round by their vector width, so a CPU of
    # another capability gives other accuracies (within the intervals, not bit for bit)
    report = {"config": {**asdict(cfg), "learning_rates": cfg.phase_lrs()}, "environment": env, "runs": runs,
              "summary": summary}
    if elapsed_s is not None:
        report["elapsed_s"] = elapsed_s
    return report


def _describe(cfg: dict) -> str:
    dense, sparse, redense = cfg["epochs"]
    if cfg.get("protocol") == "sparse":
        total = dense + sparse + redense
        lr = f"; lr {cfg['lr']:g}, lr/10 from epoch {math.ceil(2 * total / 3) + 1}"
        tiles = f" of {cfg['block'][0]}x{cfg['block'][1]} tiles" if cfg.get("block") else ""
        first_conv = "; first conv dense" if cfg.get("first_conv") == "dense" else ""
        return (f"sparse protocol: {total} epochs from scratch, sparsity {cfg['sparsity']}{tiles}{lr}; SET and RigL "
                f"update the masks after every epoch until 3/4 of the steps{first_conv}")
    cycles = f" x{cfg['cycles']}" if cfg["cycles"] > 1 else ""
    ramp = (f" reached gradually over {cfg['ramp_epochs']} epochs (every {cfg.get('ramp_every', 1)})"
            if cfg.get("ramp_epochs") else "")
    if cfg.get("learning_rates"):  # every phase's absolute rate
        lrs = cfg["learning_rates"]
        rates = f"; lr {lrs['dense']:g} dense, {lrs['sparse']:g} sparse, {lrs['redense']:g} re-dense"
    else:  # a report from before the rates were recorded
        rates = (f"; lr x{cfg['sparse_lr_scale']:g} sparse, x{cfg['redense_lr_scale']:g} re-dense (both of lr)"
                 if cfg.get("sparse_lr_scale") is not None else "")
    first_conv = "; first conv dense" if cfg.get("first_conv") == "dense" else ""
    if cfg.get("block"):
        ramp += f" of {cfg['block'][0]}x{cfg['block'][1]} tiles"
    if cfg.get("protocol", "matched") == "paper":
        return (f"paper protocol: pre-trained {dense} epochs, then sparse {sparse} + re-dense "
                f"{redense}{cycles}, sparsity {cfg['sparsity']}{ramp}{rates}{first_conv}")
    return f"matched protocol: epochs {dense}+{sparse}+{redense}{cycles}, sparsity {cfg['sparsity']}{ramp}{rates}{first_conv}"


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = ["QUICK RUN (--quick): a smoke test of the job, not a result to quote", ""] if cfg.get("quick") else []
    for model, entry in report["summary"].items():
        data = entry.get("data", cfg.get("data"))
        # --train-samples applies to --data, or to MNIST-1D when each model takes its own data
        limited = cfg["train_samples"] is not None and (cfg.get("data") is not None or data == "mnist1d")
        samples = cfg["train_samples"] if limited else "all"
        lines.append(f"{model} on {data} ({samples} training samples, "
                     f"{_seeds(cfg['seeds'])}, {_describe(cfg)})")
        lines.append("  arm       test accuracy %")
        for m, s in entry["methods"].items():
            lines.append(f"  {m:<8}  {_pm(s):>6}")
        for m, seeds in entry.get("diverged", {}).items():
            if seeds:
                lines.append(f"  {m:<8}  diverged on seeds {seeds}")
        for name, p in entry["paired"].items():
            lines.append(f"  {_pair_label(name):<14}  {p['mean']:+6.2f} points, {_interval(p)} (paired by seed; "
                         f"{_counts(p)}): {p.get('verdict', '')}")
        sparse = next((ph for ph in entry.get("dsd_phases", []) if ph["name"] == "sparse"), None)
        if sparse is not None:
            lines.append(f"  DSD at the end of its sparse phase: {_pm(sparse['test_accuracy'])}")
        lines.append("")
    return "\n".join(lines)


def _pm(stat: dict) -> str:
    """mean +- std, without a std of one value"""
    return f"{stat['mean']:.2f}" + (f" +- {stat['std']:.2f}" if stat["n"] > 1 else "")


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _interval(p: dict) -> str:
    ci = p.get("ci95")
    return "no interval (one seed)" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _counts(p: dict) -> str:
    if "losses" not in p:  # a report from before the counts
        return f"higher on {p['wins']}/{p['n']}"
    return f"{p['wins']} / {p['ties']} / {p['losses']} of {p['n']}"


def summary_tables(report: dict) -> str:
    """Two markdown tables of a report's summary: each arm's test accuracy per model, then every
    paired difference with its interval, seed counts and verdict (what the docs pages show of a
    committed run, written from its report.json by dsd_kernels.app.bench.tables)."""
    cfg = report["config"]
    arms = ARMS[cfg.get("protocol", "matched")]
    lines = ["| model (data) | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for model, entry in report["summary"].items():
        cells = [(_pm(entry["methods"][a]) if a in entry["methods"] else "diverged") for a in arms]
        lines.append(f"| {model} ({entry.get('data', cfg.get('data'))}) | " + " | ".join(cells) + " |")
    lines += ["", "| model | paired difference | points: mean | 95% interval | seeds higher / tied / lower | verdict |",
              "|---|---|---|---|---|---|"]
    for model, entry in report["summary"].items():
        lines += [f"| {model} | {_pair_label(name)} | {p['mean']:+.2f} | {_interval(p)} | {_counts(p)} | "
                  f"{p.get('verdict', '')} |" for name, p in entry["paired"].items()]
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    cfg = report["config"]
    title = ("RigL vs dense, a static mask and SET" if cfg.get("protocol") == "sparse" else "DSD vs its baselines")
    out = [f"# {title}" + (" (quick run)" if cfg.get("quick") else ""), ""]
    if cfg.get("quick"):
        out += [f"**A --quick run** (epochs {cfg['epochs']}, {cfg.get('train_samples') or 'all'} training samples, "
                f"{_seeds(cfg['seeds'])}): a smoke test of the job, not a result to quote.", ""]
    out += [f"{_describe(cfg)}; models {', '.join(cfg['models'])}; {_seeds(cfg['seeds'])}; "
           f"{cfg.get('optimizer', 'sgd').upper()} lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay "
           f"{cfg['weight_decay']}, batch {cfg['batch_size']}; device {cfg['device']}.", ""]
    env = report.get("environment")
    if env:
        where = env.get("gpu") or f"{env.get('cpu')}, {env.get('cpu_capability')} capability, {env.get('cpu_threads')} threads"
        out += [f"Run with dsd-kernels {env.get('dsd_kernels')}, torch {env.get('torch')}, Python {env.get('python')} "
                f"on {where}. torch's CPU kernels round by their vector width: the same job on a CPU of another "
                f"capability gives other accuracies (within the intervals, not bit for bit).", ""]
    for model, entry in report["summary"].items():
        out += [f"## {model} on {entry.get('data', cfg.get('data'))}", "",
                "| arm | test accuracy % (mean +- std) |", "|---|---|"]
        out += [f"| {m} | {_pm(s)} |" for m, s in entry["methods"].items()]
        out += [f"| {m} | diverged on seeds {seeds} |" for m, seeds in entry.get("diverged", {}).items() if seeds]
        out += ["", "| paired difference (by seed) | points: mean | 95% interval | seeds higher / tied / lower "
                "| verdict |", "|---|---|---|---|---|"]
        out += [f"| {_pair_label(name)} | {p['mean']:+.2f} | {_interval(p)} | {_counts(p)} | "
                f"{p.get('verdict', '')} |" for name, p in entry["paired"].items()]
        if "pruned_fraction" in entry:
            out += ["", "| arm | weights at 0 at the end: pruned layers | whole model |", "|---|---|---|"]
            out += [f"| {m} | {f['pruned_layers']:.3f} | {f['whole_model']:.3f} |"
                    for m, f in entry["pruned_fraction"].items()]
        if "dsd_phases" in entry:
            out += ["", "| DSD phase | test accuracy % at its end | weights at 0: pruned layers | weights at 0: "
                    "whole model |", "|---|---|---|---|"]
            for ph in entry["dsd_phases"]:
                frac = ph.get("pruned_fraction")
                cells = (f"{frac['pruned_layers']:.3f} | {frac['whole_model']:.3f}" if frac else "n/a | n/a")
                out.append(f"| {ph['name']} | {_pm(ph['test_accuracy'])} | {cells} |")
        out.append("")
    out += ["![test accuracy](accuracy.png)", "", "![paired differences](differences.png)", ""]
    if cfg.get("protocol") != "sparse":  # the DSD arm's weights after each phase
        out += ["![weight distribution](weights.png)", ""]
    return "\n".join(out)


def _save_figure(fig, path: str) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_accuracy(report: dict, path: str) -> None:
    """Test accuracy per epoch, mean +- std over seeds, per arm; dashed lines at DSD's phase
    boundaries (paper protocol: the pre-training's curve is the baseline's, the arms continue it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    models = cfg["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False,
                             layout="constrained")
    # the last epoch of each phase but the last
    boundaries = [] if cfg.get("protocol") == "sparse" else [
        first + length for _, first, length in PhasePlan(*cfg["epochs"], cycles=cfg["cycles"]).phases()[:-1]]
    arms = ARMS[cfg.get("protocol", "matched")]
    for ax, model in zip(axes[0], models):
        for method in arms:
            curves = [[(h["epoch"], h["test_accuracy"]) for h in r["history"]] for r in report["runs"]
                      if r["model"] == model and r["method"] == method and not r.get("diverged")]
            if not curves:
                continue
            epochs = [e for e, _ in curves[0]]
            mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(epochs))]
            std = [statistics.stdev(c[i][1] for c in curves) if len(curves) > 1 else 0.0
                   for i in range(len(epochs))]
            label = "baseline (pre-training)" if method == "baseline" else method
            ax.plot(epochs, mean, label=label)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            alpha=0.2)
        for b in boundaries:
            ax.axvline(b + 0.5, color="grey", linestyle="--", linewidth=0.8)
        _plot_dsd_sparsity(ax, [r for r in report["runs"] if r["model"] == model and r["method"] == "dsd"
                                and not r.get("diverged")])
        ax.set_title(f"{model}: test accuracy, mean +- std over {_seeds(cfg['seeds'])}" +
                     ("" if not boundaries else "\ndashed: DSD phase boundaries (dense | sparse | re-dense)"),
                     fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.legend(loc="lower left")
    _save_figure(fig, path)
    plt.close(fig)


def plot_differences(report: dict, path: str) -> None:
    """Per model, the paired differences DSD - baseline and DSD - llr of every seed (points) with
    their mean and 95% interval: the sub-point gaps the accuracy plot's scale hides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = [(m, e) for m, e in report["summary"].items() if e["paired"]]
    fig, axes = plt.subplots(1, max(len(entries), 1), figsize=(4.5 * max(len(entries), 1), 3.6), squeeze=False)
    for ax, (model, entry) in zip(axes[0], entries):
        for x, (name, p) in enumerate(entry["paired"].items()):
            diffs = p.get("differences", [])
            ax.scatter([x] * len(diffs), diffs, s=14, alpha=0.7, label=None)
            ci = p.get("ci95")
            if ci is not None:
                ax.errorbar([x + 0.15], [p["mean"]], yerr=[[p["mean"] - ci[0]], [ci[1] - p["mean"]]], fmt="o",
                            color="black", capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(entry["paired"])), [_pair_label(n) for n in entry["paired"]])
        ax.set_ylabel("test accuracy difference (points)")
        ax.set_title(f"{model}: paired by seed, mean and 95% interval", fontsize=10)
    _save_figure(fig, path)
    plt.close(fig)


def _plot_dsd_sparsity(ax, runs: list) -> None:
    """DSD's pruned fraction per epoch (the first seed's: every seed prunes on the same plan), on
    a right-hand axis: a gradual prune shows as steps."""
    history = next((r["history"] for r in runs if r["history"] and "sparsity" in r["history"][0]), None)
    if history is None:
        return
    right = ax.twinx()
    right.step([h["epoch"] for h in history], [h["sparsity"] for h in history], where="mid", color="grey",
               alpha=0.6, linewidth=1.2, label="DSD pruned fraction")
    right.set_ylim(0, 1)
    right.set_ylabel("DSD pruned fraction (grey)")


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
    """Plots, report.md, then report.json last: its presence means the job finished. Strict
    JSON (no NaN or inf: a diverged run's accuracy is null)."""
    text = json.dumps(report, indent=1, allow_nan=False)  # fails here, before any file, if not strict
    plot_accuracy(report, os.path.join(out_dir, "accuracy.png"))
    if report["config"].get("protocol") != "sparse":
        plot_weights(snapshots, os.path.join(out_dir, "weights.png"))
    plot_differences(report, os.path.join(out_dir, "differences.png"))
    atomic_write_text(os.path.join(out_dir, "report.md"), _markdown(report))
    atomic_write_text(os.path.join(out_dir, "report.json"), text)

