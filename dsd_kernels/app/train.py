"""The `dsd-kernels train` job: DSD against its fair baselines, per model and seed.

protocol="paper" (the default; Han et al., ICLR 2017): per seed, one dense pre-training to
convergence (epochs[0] epochs at `lr`, the last third at lr x redense_lr_scale; trained once,
saved under pretrained/, shared by the arms), then from those same weights, optimizer state and
batch-order generator:
- baseline: the converged model as is;
- llr:      dense, at DSD's rates for as many epochs as DSD's sparse and re-dense phases (the
            paper's lower-learning-rate baseline);
- dsd:      pruned to `sparsity`, sparse at lr x sparse_lr_scale, re-dense at that rate x
            redense_lr_scale (each scale relative to the phase before, as DSDScheduler's).
protocol="matched": every arm from scratch for the same total epochs:
- dense: dense, the learning rate drops to DSD's re-dense rate where DSD re-denses;
- llr:   dense, the drop right after the first dense phase;
- dsd:   dense -> sparse -> re-dense (DSDScheduler).
One MaskedSGD (or MaskedAdamW, optimizer="adamw") per run. Runs are written as they finish
(runs/<id>.json); with checkpoint_every an interrupted job resumes from checkpoints/ to the same
final numbers (fixed seeds, CPU). A run whose loss turns non-finite stops there and is reported
as diverged; the other runs go on.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict

import torch

from .._files import (DamagedFile, atomic_write_text, checked_torch_load, checked_torch_save, previous_path,
                      remove_checked)
from .config import LR_SCALES, TrainConfig, load_config
from .data import load_data
from .models import build_model
from .report import build_report, write_report
from .run import Run, RunDiverged, check_dsd_scope, diverged_result, world

__all__ = ["run_job", "Run", "TrainConfig"]


def plan_runs(cfg: TrainConfig) -> list[tuple[str, str, int]]:
    """(method, model, seed) in training order: per model and seed the arms, the pre-training
    (paper: "baseline") first."""
    return [(method, model, seed) for model in cfg.models for seed in range(cfg.seeds)
            for method in cfg.arms]


# settings a resumed job may change without changing any result (see config.RESUME_MAY_CHANGE)
_NOT_IN_JOB_KEY = ("device", "nproc", "checkpoint_every")


def job_key(cfg: TrainConfig) -> str:
    """A digest of the settings that decide a job's results: each run file carries it."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_JOB_KEY}
    legacy = getattr(cfg, "legacy_redense_lr_factor", None)
    if legacy is not None:  # a job from before the relative scales: its run files' key, as it was
        settings["redense_lr_scale"] = legacy
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _remove_stale_temporaries(out_dir: str) -> None:
    """Files a kill left half-written (atomic writes go to <name>.tmp<pid> first)."""
    for pattern in ("*.tmp*", os.path.join("*", "*.tmp*")):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            if os.path.isfile(path):
                os.remove(path)


def _load_checkpoint(path: str, what: str, *, previous: bool = False):
    """A checkpoint read back and checked against its sha256; a damaged one is reported by name
    (with the word "damaged") and, with `previous`, the last good one kept beside it is taken
    instead; None where none is good (`what` says what happens then)."""
    candidates = [path] + ([previous_path(path)] if previous else [])
    for i, candidate in enumerate(candidates):
        if not os.path.exists(candidate):
            continue
        try:
            state = checked_torch_load(candidate)
        except DamagedFile as err:
            warnings.warn(f"{err}; " + ("trying the previous checkpoint " + candidates[i + 1]
                                       if i + 1 < len(candidates) and os.path.exists(candidates[i + 1]) else what),
                          stacklevel=2)
            continue
        if i > 0:
            warnings.warn(f"resuming from the previous good checkpoint {candidate}", stacklevel=2)
        return state
    return None


def _load_datasets(cfg: TrainConfig, size: int) -> dict:
    """Every model's data, loaded and checked before anything is written."""
    datasets = {}
    for model in cfg.models:
        spec = cfg.data_for(model)
        if spec not in datasets:
            # --train-samples applies to --data, or to MNIST-1D when each model takes its own data
            datasets[spec] = load_data(spec, cfg.train_samples if cfg.data is not None or spec == "mnist1d"
                                       else None)
        check_dsd_scope(cfg, model, build_model(model, datasets[spec].num_features, datasets[spec].num_classes))
        n, bs = len(datasets[spec].x_train), cfg.batch_size
        if 0 < n % bs < size:
            raise ValueError(f"{spec}: the last batch of each epoch has {n % bs} samples for {size} "
                             f"processes: some rank would get none (change --batch-size or --train-samples)")
    return datasets


def _prepare_out_dir(cfg: TrainConfig, out_dir: str, *, resume: bool, writer: bool, size: int) -> None:
    """runs/, checkpoints/, pretrained/ and config.json (a new job), or a resumed job's
    half-written files removed; every rank waits for rank 0."""
    config_path = os.path.join(out_dir, "config.json")
    if not resume and os.path.exists(config_path):
        raise ValueError(f"--out {out_dir} already holds a job; use --resume {out_dir} or another --out")
    if not resume and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"--out {out_dir} is not empty and holds no dsd-kernels train job (no config.json): "
                         f"the job would write over its files; give a new or empty folder")
    if size > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    if writer:
        for sub in ("runs", "checkpoints", "pretrained"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        if resume:
            _remove_stale_temporaries(out_dir)
        else:
            atomic_write_text(config_path, json.dumps({**asdict(cfg), "lr_scales": LR_SCALES}, indent=2))
    if size > 1:
        torch.distributed.barrier()


class _Job:
    """The runs of one job in order: each reused from runs/ if finished, else trained (from its
    checkpoint if any) and written; rank 0 writes every file (`writer`)."""

    def __init__(self, cfg: TrainConfig, out_dir: str, datasets: dict, bar, *, writer: bool, size: int,
                 on_epoch_end=None):
        self.cfg, self.out_dir, self.datasets, self.bar = cfg, out_dir, datasets, bar
        self.writer, self.size, self.on_epoch_end = writer, size, on_epoch_end
        self.runs: list[dict] = []
        self.snapshots: dict = {}

    def _path(self, sub: str, name: str) -> str:
        return os.path.join(self.out_dir, sub, name)

    def record(self, result: dict, path: str) -> None:
        """A finished (or diverged) run: into the report and, on the writing rank, runs/, marked
        with the job's key (job_key) so that only this job's configuration reuses it."""
        result = {**result, "job": job_key(self.cfg)}
        self.runs.append(result)
        if self.writer:
            atomic_write_text(path, json.dumps(result, allow_nan=False))

    def run(self, method: str, model: str, seed: int) -> None:
        cfg = self.cfg
        if self.size > 1:
            torch.distributed.barrier()  # every rank sees the same finished runs and checkpoints
        data = self.datasets[cfg.data_for(model)]
        run_id = f"{method}-{model}-seed{seed}"
        result_path = self._path("runs", f"{run_id}.json")
        snap_path = self._path("runs", f"{run_id}.snapshots.pt")
        if os.path.exists(result_path):
            self._reuse(result_path, snap_path, method, model, seed)
            self.bar.update(cfg.run_epochs(method))
            return
        start = None
        if cfg.protocol == "paper" and method != "baseline":
            pretraining = next(r for r in self.runs if r["model"] == model and r["seed"] == seed
                               and r["method"] == "baseline")
            if pretraining.get("diverged"):
                self.record(diverged_result(method, model, seed, data.name, "its pre-training diverged", None),
                            result_path)
                self.bar.update(cfg.run_epochs(method))
                return
            start = self._pretrained(model, seed)
        run = Run(cfg, data, method, model, seed, capture_weights=(method == "dsd" and seed == 0), start=start)
        ckpt_path = self._path("checkpoints", f"{run_id}.pt")
        if self._train(run, ckpt_path, result_path):
            self._finish(run, snap_path, ckpt_path, result_path)

    def _reuse(self, result_path: str, snap_path: str, method: str, model: str, seed: int) -> None:
        """A finished run of this job read back; anything else there is an error naming the file
        (never reported as this job's result, never written over)."""
        try:
            with open(result_path) as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{result_path} is not a finished run's result ({err}); move it away to train "
                             f"that run again") from None
        expected = {"method": method, "model": model, "seed": seed}
        if not isinstance(result, dict) or any(result.get(k) != v for k, v in expected.items()) or \
                "test_accuracy" not in result:
            raise ValueError(f"{result_path} is not the result of run {method}-{model}-seed{seed}; move it "
                             f"away to train that run again")
        if result.get("job", job_key(self.cfg)) != job_key(self.cfg):  # results before "job": by name only
            raise ValueError(f"{result_path} was written by a job with other settings than {self.out_dir}'s "
                             f"config.json; move it away to train that run again")
        self.runs.append(result)
        if os.path.exists(snap_path):
            self.snapshots[model] = _load_checkpoint(snap_path, "its weight histograms are left out of the report")

    def _pretrained(self, model: str, seed: int) -> dict:
        """The paper protocol's shared pre-training of this model and seed."""
        path = self._path("pretrained", f"{model}-seed{seed}.pt")
        start = _load_checkpoint(path, "the pre-training cannot be shared; delete "
                                 f"runs/baseline-{model}-seed{seed}.json to train it again")
        if start is None:
            raise ValueError(f"{path} is damaged: delete runs/baseline-{model}-seed{seed}.json "
                             f"and resume to pre-train that seed again")
        return start

    def _train(self, run: Run, ckpt_path: str, result_path: str) -> bool:
        """Train the run to its end from its checkpoint if any; False if it diverged (recorded)."""
        cfg = self.cfg
        if os.path.exists(ckpt_path) or os.path.exists(previous_path(ckpt_path)):
            state = _load_checkpoint(ckpt_path, f"run {run.id} restarts from scratch", previous=True)
            if state is not None:
                run.load_state_dict(state)
                self.bar.update(run.epoch)
        self.bar.set_description(run.id)
        try:
            while run.epoch < run.epochs:
                run.run_epoch()
                self.bar.update(1)
                if cfg.checkpoint_every and run.epoch % cfg.checkpoint_every == 0 and run.epoch < run.epochs:
                    state = run.state_dict()  # every rank: a sharded model's state is gathered
                    if self.writer:
                        checked_torch_save(state, ckpt_path, keep_previous=True)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(run)
        except RunDiverged as err:
            # the last finite checkpoint (if any) stays in checkpoints/
            warnings.warn(str(err), stacklevel=1)
            self.record(diverged_result(run.method, run.model_name, run.seed, run.data.name, str(err),
                                        run.first_epoch + run.epoch + 1), result_path)
            self.bar.update(run.epochs - run.epoch)
            return False
        return True

    def _finish(self, run: Run, snap_path: str, ckpt_path: str, result_path: str) -> None:
        if run.snapshots:
            self.snapshots[run.model_name] = run.snapshots
        state = run.state_dict() if run.method == "baseline" else None  # every rank (see _train)
        if self.writer:
            if run.snapshots:
                checked_torch_save(run.snapshots, snap_path)
            if run.method == "baseline":  # the arms of this seed start from it
                checked_torch_save(state, self._path("pretrained", f"{run.model_name}-seed{run.seed}.pt"))
        self.record(run.result(), result_path)
        if self.writer:
            remove_checked(ckpt_path)


def run_job(cfg: TrainConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
            on_epoch_end=None, given: dict | None = None) -> dict:
    """Train every (model, seed, arm), write runs/ and the report under out_dir; return the report.

    resume=True continues the job whose config.json is in out_dir (cfg is then ignored but for
    `given`, the settings named on the command line: see load_config). on_epoch_end(run) is
    called after every epoch (tests use it).
    """
    from tqdm.auto import tqdm

    if resume:
        cfg = load_config(out_dir, given)
    rank, size = world()
    if size != cfg.nproc:
        if not (resume and cfg.fsdp):  # an FSDP job's checkpoints hold full state dicts: any world size
            raise ValueError(f"the job is configured for --nproc {cfg.nproc} but runs in {size} processes"
                             + (" (resume it with the --nproc it was started with)" if resume else ""))
        cfg.nproc = size
    try:
        cfg.validate()
    except ValueError as err:
        if not resume:
            raise
        raise ValueError(f"--resume {out_dir}: {os.path.join(out_dir, 'config.json')}: {err}") from None
    datasets = _load_datasets(cfg, size)  # errors in the data surface before anything is written
    writer = rank == 0  # in a data-parallel job rank 0 writes every file; all ranks read them
    _prepare_out_dir(cfg, out_dir, resume=resume, writer=writer, size=size)
    plan = plan_runs(cfg)
    started = time.perf_counter()
    with tqdm(total=sum(cfg.run_epochs(m) for m, _, _ in plan), unit="epoch",
              disable=not progress or not writer, dynamic_ncols=True) as bar:
        job = _Job(cfg, out_dir, datasets, bar, writer=writer, size=size, on_epoch_end=on_epoch_end)
        for method, model, seed in plan:
            job.run(method, model, seed)
    report = build_report(cfg, job.runs, elapsed_s=sum(r.get("elapsed_s", 0.0) for r in job.runs))
    report["segment_elapsed_s"] = time.perf_counter() - started
    if writer:
        write_report(report, job.snapshots, out_dir)
    return report
