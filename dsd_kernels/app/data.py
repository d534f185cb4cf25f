"""Data for `dsd-kernels train`: generated MNIST-1D (default), scikit-learn's bundled digits,
or the user's own .npz (x_train, y_train, x_test, y_test). Nothing is downloaded."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, features) float32, standardised with the training statistics
    y_train: torch.Tensor  # (N,) int64 in [0, num_classes)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> str | None:
    """Where generated data is kept between runs: $DSD_KERNELS_CACHE_DIR, else
    $XDG_CACHE_HOME/dsd_kernels or ~/.cache/dsd_kernels; "off" (or "0") keeps nothing."""
    given = os.environ.get("DSD_KERNELS_CACHE_DIR", "").strip()
    if given.lower() in ("off", "0"):
        return None
    if given:
        return given
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsd_kernels")


def _mnist1d_cache_path(args) -> str | None:
    import hashlib
    import importlib.metadata
    root = cache_dir()
    if root is None:
        return None
    # the generator's version and every argument name the arrays: another of either generates anew
    key = repr((importlib.metadata.version("mnist1d"), sorted(vars(args).items())))
    return os.path.join(root, f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")


def _read_cached(path: str):
    try:
        with np.load(path, allow_pickle=False) as f:
            return tuple(f[k] for k in MNIST1D_KEYS)
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: generate anew (and rewrite)
        return None


def _write_cached(path: str, arrays) -> None:
    import tempfile
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.partial")
    except OSError:
        return  # a read-only home: the cache only saves time, so the run goes on without it
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(MNIST1D_KEYS, arrays)))
        os.replace(tmp, path)  # whole or absent, also when ranks of one job write it at once
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


@lru_cache(maxsize=1)
def _mnist1d_arrays():
    """MNIST-1D as mnist1d generates it (4000 train / 1000 test, length 40, fixed seed), kept in
    cache_dir() after the first generation: generating takes seconds, reading the file
    milliseconds, and the arrays read back are the generated ones bit for bit."""
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    path = _mnist1d_cache_path(args)
    if path is not None and (cached := _read_cached(path)) is not None:
        return cached
    data = make_dataset(args)
    arrays = tuple(data[k] for k in MNIST1D_KEYS)
    if path is not None:
        _write_cached(path, arrays)
    return arrays


def _mnist1d():
    return tuple(a.copy() for a in _mnist1d_arrays())


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


def _npz(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"--data: {path!r} is neither 'mnist1d', 'digits' nor an existing .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - empty, truncated, not numpy at all
        raise ValueError(f"--data {path}: not a readable .npz archive ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:100] if str(err) else 'empty or truncated'})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"--data {path}: a single array (.npy), not an .npz archive holding "
                         f"x_train, y_train, x_test, y_test")
    with loaded as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
        if missing:
            raise ValueError(f"--data {path}: missing arrays {missing} (has {sorted(f.files)})")
        try:
            return tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        except Exception as err:  # noqa: BLE001 - a member truncated or corrupt inside the zip
            raise ValueError(f"--data {path}: an array cannot be read ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:100]})") from None


def _check(name, x_train, y_train, x_test, y_test):
    """Shapes, dtypes and labels; returns the number of classes. Labels must be 0..K-1 with
    every class present in y_train (K >= 2), as the model's K-way output assumes."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 2:
            raise ValueError(f"{name}: x_{split} must be 2-D (samples, features), got shape {x.shape}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: x_{split} has no features (shape {x.shape})")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{name}: y_{split} must be 1-D with one label per row of x_{split}, "
                             f"got shape {y.shape} for {len(x)} samples")
        if len(x) == 0:
            raise ValueError(f"{name}: x_{split} is empty")
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"{name}: x_{split} must hold real numbers, got {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: x_{split} must hold finite numbers")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: y_{split} must hold integer class labels, got {y.dtype}")
        if y.min() < 0:
            raise ValueError(f"{name}: y_{split} has negative label {int(y.min())}")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{name}: x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError(f"{name}: need at least 2 classes, y_train has only label {int(classes[0])}")
    if int(classes[-1]) != len(classes) - 1:
        absent = sorted(set(range(min(int(classes[-1]), len(classes) + 5))) - {int(c) for c in classes})[:5]
        raise ValueError(f"{name}: y_train labels must be 0..K-1 with every class present; it has "
                         f"{len(classes)} distinct labels up to {int(classes[-1])} (missing e.g. {absent})")
    num_classes = len(classes)
    if y_test.max() >= num_classes:
        raise ValueError(f"{name}: y_test has label {int(y_test.max())}, out of range for the "
                         f"{num_classes} classes seen in y_train (labels 0..{num_classes - 1})")
    return num_classes


def _standardise(name: str, x_train: np.ndarray, x_test: np.ndarray):
    """(x - mean) / std with the training statistics, in float64 (so large values do not
    overflow), checked finite and informative before the float32 cast."""
    train, test = x_train.astype(np.float64), x_test.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = train.mean(), train.std()
        scaled = [(a - mean) / (std if std > 0 else 1.0) for a in (train, test)]
    if not (np.isfinite(mean) and np.isfinite(std)) or not all(np.isfinite(a).all() for a in scaled):
        raise ValueError(f"{name}: x values too large to standardise (largest |x| "
                         f"{float(np.abs(train).max()):.3g}); rescale the data")
    if not np.isfinite(scaled[0].astype(np.float32)).all() or not np.isfinite(scaled[1].astype(np.float32)).all():
        raise ValueError(f"{name}: x_test lies too far outside x_train's range to standardise in float32")
    return scaled


def load_data(spec: str = "mnist1d", train_samples: int | None = None) -> Dataset:
    """Load `spec` ("mnist1d", "digits" or a .npz path); keep the first train_samples training rows."""
    loaders = {"mnist1d": _mnist1d, "digits": _digits}
    x_train, y_train, x_test, y_test = loaders[spec]() if spec in loaders else _npz(spec)
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    num_classes = _check(spec, x_train, y_train, x_test, y_test)
    if train_samples is not None:
        if not 1 <= train_samples <= len(x_train):
            raise ValueError(f"--train-samples must be in [1, {len(x_train)}] for {spec}, got {train_samples}")
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
        found = np.unique(y_train)
        # e.g. a file sorted by label: the job would learn one class. Every class where the rows
        # are enough for shuffled data to hold them all (10 per class), two at least otherwise
        if len(found) < (num_classes if train_samples >= 10 * num_classes else 2):
            shown = ", ".join(str(int(c)) for c in found[:10]) + (", ..." if len(found) > 10 else "")
            raise ValueError(f"--train-samples {train_samples}: the first {train_samples} training rows of {spec} "
                             f"hold only the classes {{{shown}}} ({len(found)} of {num_classes}); every class "
                             f"must be trained on (two at least below {10 * num_classes} rows): shuffle the data or "
                             f"take more rows")
    x_train, x_test = _standardise(spec, x_train, x_test)
    as_x = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(a.astype(np.int64))  # labels checked < num_classes: no overflow  # noqa: E731
    return Dataset(os.path.basename(spec), as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test),
                   num_classes)
