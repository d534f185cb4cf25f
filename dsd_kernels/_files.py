"""Writing files so that a crash or a kill never leaves a half-written one: write beside the
target, then rename over it (atomic on POSIX and Windows within one file system)."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """A temporary path beside `path` to write to; it replaces `path` when the block ends
    without error and is removed otherwise. suffix: e.g. ".png" where the writer picks the
    format from the name."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_torch_save(obj, path: str) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
